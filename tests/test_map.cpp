// map, starmap, imap, imap_unordered and apply against a serial reference.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <forward_list>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <numeric>
#include <optional>
#include <ranges>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "common.hpp"

namespace {

long square(long x) { return x * x; }
long nap_1ms(long x) {
  std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return x;
}
long slow_first(long x) {
  std::this_thread::sleep_for(std::chrono::milliseconds(x == 0 ? 500 : 1));
  return x;
}
std::string g_prefix;
void set_prefix(const std::string& p) { g_prefix = p; }
std::string prefixed(const std::string& s) { return g_prefix + s; }
long add(long a, long b) { return a + b; }
std::size_t slow_size(const std::string& s) {
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  return s.size();
}
std::string shout(const std::string& s) { return s + "!"; }
long key_plus_value(std::pair<int, long> kv) { return kv.first + kv.second; }
/// Sleeps `job.second` ms; one that sleeps at all appends a byte to the file `job.first`.
long nap_and_mark(const std::pair<std::string, long>& job) {
  std::this_thread::sleep_for(std::chrono::milliseconds(job.second));
  if (job.second > 0) std::ofstream(job.first, std::ios::app) << 'x';
  return job.second;
}
std::size_t view_size(std::string_view s) { return s.size(); }
long key_value_times(std::pair<int, long> kv, long factor) { return (kv.first + kv.second) * factor; }
std::size_t view_size_times(std::string_view s, long factor) { return s.size() * static_cast<std::size_t>(factor); }
std::size_t total_size(const std::vector<std::vector<std::string>>& v) {
  std::size_t n = 0;
  for (const auto& inner : v) n += inner.size();
  return n;
}

struct Point {
  double x = 0, y = 0;
  std::string label;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(x, y, label);
  }
  bool operator==(const Point&) const = default;
};
Point mirror(Point p) { return {p.y, p.x, p.label + "'"}; }

struct Scale {
  double factor = 1;
  double operator()(double x) const { return x * factor; }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(factor);
  }
};

/// Leaves a marker file (if given a path), then measures the payload.
std::size_t mark_and_measure(const std::pair<std::string, std::string>& item) {
  if (!item.first.empty()) test::append_line(item.first, "ran");
  return item.second.size();
}

/// Waits up to `limit` for `file` to exist.
bool wait_for_file(const std::string& file, std::chrono::milliseconds limit) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (::access(file.c_str(), F_OK) != 0) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

/// Given a path, waits up to 10 s for that file: the size, or -1 if it never came.
long wait_then_measure(const std::pair<std::string, std::string>& item) {
  if (!item.first.empty() && !wait_for_file(item.first, std::chrono::seconds(10))) return -1;
  return static_cast<long>(item.second.size());
}

/// A value whose decoding in the parent throws something that is not a
/// std::exception when it holds 0.
struct Touchy {
  long v = 0;
  template <class Archive>
  void save(Archive& ar) const {
    ar(v);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(v);
    if (v == 0) throw 42;
  }
};
Touchy touchy_slow_first(long x) {
  if (x == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  return {x};
}

using test::iota_vec;

template <class F, class T>
auto serial(F f, const std::vector<T>& in) {
  std::vector<decltype(f(in[0]))> out;
  for (const auto& x : in) out.push_back(f(x));
  return out;
}

}  // namespace

POOL_TEST("map returns results in input order for every chunk size", "[map]") {
  procpool::Pool pool(test::options<TestType>());
  auto in = iota_vec(1000);
  auto expected = serial(square, in);
  for (std::size_t chunksize : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{5000}}) {
    CAPTURE(chunksize);
    CHECK(pool.map<square>(in, chunksize) == expected);
  }
}

POOL_TEST("map handles empty and single-item input", "[map]") {
  procpool::Pool pool(test::options<TestType>());
  CHECK(pool.map<square>(std::vector<long>{}).empty());
  CHECK(pool.map<square>(std::vector<long>{9}) == std::vector<long>{81});
  CHECK(pool.map<square>(std::vector<long>{9}, 100) == std::vector<long>{81});
}

POOL_TEST("map sends work while it is still encoding the rest of its input", "[map]") {
  // The first item (2 MiB) is a batch of its own; the second item is made
  // only once a worker has run the first. A map that encoded its whole input
  // before sending any would wait here in vain.
  procpool::Pool pool(test::options<TestType>());
  test::TempDir dir;
  const std::string marker = dir / "first-ran";
  bool first_ran_before_second_made = false;
  auto items = tv::iota(0, 2) | tv::transform([&](int i) {
                 if (i == 0) return std::pair{marker, std::string(std::size_t{2} << 20, 'x')};
                 first_ran_before_second_made = wait_for_file(marker, std::chrono::seconds(20));
                 return std::pair{std::string(), std::string("y")};
               });
  CHECK(pool.map<mark_and_measure>(items, 1) == std::vector<std::size_t>{std::size_t{2} << 20, 1});
  CHECK(first_ran_before_second_made);
}

POOL_TEST("map keeps at most imap_prefetch_bytes of task messages ahead of the workers", "[map]") {
  // 48 items of 1 MiB, a 4 MiB bound, 2 workers holding one task each: each
  // item is made only once at most 4 chunks are out (3 fit under 4 MiB; 4 are
  // what the workers may hold plus one each). A map that encoded its whole
  // input first would make all 48 long before the slow tasks are done.
  procpool::Pool pool(
      test::options<TestType>({.processes = 2, .max_tasks_in_flight = 1, .imap_prefetch_bytes = std::size_t{4} << 20}));
  std::atomic<std::size_t> done{0};
  std::size_t pulled = 0;
  std::size_t most_ahead = 0;
  auto items = tv::iota(0, 48) | tv::transform([&](int) {
                 most_ahead = std::max(most_ahead, pulled - done.load());
                 ++pulled;
                 return std::string(std::size_t{1} << 20, 'x');
               });
  procpool::CallOptions options{.chunksize = 1,
                                .progress = [&](std::size_t n, std::optional<std::size_t>) { done = n; }};
  CHECK(pool.map<slow_size>(items, options) == std::vector<std::size_t>(48, std::size_t{1} << 20));
  CHECK(most_ahead <= 4);
}

POOL_TEST("a long task does not hold back a byte-bounded map's other work", "[map]") {
  // 200 items of 64 KiB under a 256 KiB bound. Item 0 runs until the other
  // workers' progress lets it go: 150 items must finish while it runs,
  // though tasks queued behind it on its worker hold more than the bound.
  procpool::Pool pool(test::options<TestType>({.processes = 2, .imap_prefetch_bytes = std::size_t{256} << 10}));
  test::TempDir dir;
  const std::string go = dir / "go";
  auto items = tv::iota(0, 200) | tv::transform([&](int i) {
                 return std::pair{i == 0 ? go : std::string(), std::string(std::size_t{64} << 10, 'x')};
               });
  bool released = false;
  procpool::CallOptions options{.chunksize = 1, .progress = [&](std::size_t n, std::optional<std::size_t>) {
                                  if (n >= 150 && !released) {
                                    released = true;
                                    test::append_line(go, "go");
                                  }
                                }};
  auto sizes = pool.map<wait_then_measure>(items, options);
  REQUIRE(sizes.size() == 200);
  CHECK(sizes[0] == 64 << 10);  // -1: it waited in vain, the others never got to 150
  CHECK(std::count(sizes.begin(), sizes.end(), 64 << 10) == 200);
}

POOL_TEST("a map streaming its input is not cut short by a close() meanwhile", "[map][lifecycle]") {
  // The first item goes out as a batch of its own; the pool is closed while
  // the second is being made. The map still gets every result, then the
  // pool winds down as a closed pool does.
  procpool::Pool pool(test::options<TestType>());
  auto items = tv::iota(0, 3) | tv::transform([&](int i) {
                 if (i == 1) pool.close();
                 return std::pair{std::string(), std::string(i == 0 ? std::size_t{2} << 20 : 1, 'x')};
               });
  CHECK(pool.map<mark_and_measure>(items, 1) == std::vector<std::size_t>{std::size_t{2} << 20, 1, 1});
  CHECK_THROWS_AS(pool.map<square>(std::vector<long>{1}), procpool::PoolNotRunning);
  pool.join();
}

POOL_TEST("a map that fails midway returns only after its progress callback", "[map][progress]") {
  // The callback for the first item is still running when the input breaks:
  // map must not throw (and end the life of what the callback uses) before
  // the callback is done, nor call it afterwards.
  procpool::Pool pool(test::options<TestType>());
  std::atomic<bool> started{false}, finished{false}, returned{false}, called_late{false};
  auto progress = [&](std::size_t, std::optional<std::size_t>) {
    if (returned) called_late = true;
    started = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    finished = true;
  };
  auto items = tv::iota(0, 3) | tv::transform([&](int i) {
                 if (i == 1) {
                   for (int k = 0; k < 2000 && !started; ++k) std::this_thread::sleep_for(std::chrono::milliseconds(5));
                   throw std::runtime_error("input broke at 1");
                 }
                 return std::pair{std::string(), std::string(std::size_t{2} << 20, 'x')};
               });
  CHECK_THROWS_WITH(pool.map<mark_and_measure>(items, {.chunksize = 1, .progress = progress}), "input broke at 1");
  returned = true;
  CHECK(started);
  CHECK(finished);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK_FALSE(called_late);
}

POOL_TEST("map with a chunksize larger than any input sends one chunk", "[map][chunks]") {
  procpool::Pool pool(test::options<TestType>());
  const std::size_t huge = std::numeric_limits<std::size_t>::max() - 1;  // not procpool::adaptive
  CHECK(pool.map<square>(iota_vec(5), huge) == serial(square, iota_vec(5)));
  CHECK(pool.map<square>(std::vector<long>{}, huge).empty());
}

POOL_TEST("map over 200,000 items matches the serial result", "[map]") {
  procpool::Pool pool(test::options<TestType>());
  auto in = iota_vec(200'000);
  CHECK(pool.map<square>(in) == serial(square, in));
}

POOL_TEST("map takes any input range, sized or not", "[map]") {
  procpool::Pool pool(test::options<TestType>());
  auto expected = serial(square, iota_vec(100));
  CHECK(pool.map<square>(tv::iota(0L, 100L)) == expected);
  auto odd = tv::iota(0L, 100L) | tv::filter([](long x) { return x % 2 == 1; });
  auto got = pool.map<square>(odd, 3);
  REQUIRE(got.size() == 50);
  CHECK(got[0] == 1);
  CHECK(got[49] == 99 * 99);
}

POOL_TEST("a std::map's items and string literals travel as values", "[map][types]") {
  // pair<const int, long> goes as pair<int, long>; const char* as std::string.
  procpool::Pool pool(test::options<TestType>());
  const std::map<int, long> m{{1, 10}, {2, 20}};
  CHECK(pool.map<key_plus_value>(m) == std::vector<long>{11, 22});
  const std::map<long, long> pairs{{1, 2}, {3, 4}};
  CHECK(pool.starmap<add>(pairs) == std::vector<long>{3, 7});
  CHECK(pool.map<shout>({"ab", "c"}) == std::vector<std::string>{"ab!", "c!"});
  const std::vector<const char*> words{"x", "yy", "zzz"};
  std::vector<std::size_t> sizes;
  for (std::size_t n : pool.imap<view_size>(words)) sizes.push_back(n);
  CHECK(sizes == std::vector<std::size_t>{1, 2, 3});
  // Likewise inside procpool::zip's items.
  const std::vector<long> factors{100, 1000};
  CHECK(pool.map<key_value_times>(procpool::zip(m, factors)) == std::vector<long>{1100, 22000});
  std::vector<std::size_t> scaled;
  for (std::size_t n : pool.imap<view_size_times>(procpool::zip(words, factors))) scaled.push_back(n);
  CHECK(scaled == std::vector<std::size_t>{100, 2000});
}

POOL_TEST("strings, nested containers and user structs travel both ways", "[map][types]") {
  procpool::Pool pool(test::options<TestType>());
  std::vector<std::string> words{"a", "", "hello world", std::string(100'000, 'x')};
  CHECK(pool.map<shout>(words) == serial(shout, words));

  std::vector<std::vector<std::vector<std::string>>> nested{{{"a", "b"}, {}}, {}, {{"c"}}};
  CHECK(pool.map<total_size>(nested) == std::vector<std::size_t>{2, 0, 1});

  std::vector<Point> points{{1, 2, "p"}, {3.5, -4, "q"}};
  CHECK(pool.map<mirror>(points) == serial(mirror, points));

  auto maps = pool.map(
      [](int n) {
        std::map<std::string, std::vector<int>> m;
        for (int i = 0; i < n; ++i) m[std::to_string(i)].push_back(i);
        return m;
      },
      std::vector<int>{0, 3});
  CHECK(maps[0].empty());
  CHECK(maps[1].at("2") == std::vector<int>{2});
}

POOL_TEST("a function can be named three ways", "[map][callables]") {
  procpool::Pool pool(test::options<TestType>());
  std::vector<double> in{1, 2, 3};
  // a function as template argument
  CHECK(pool.map<square>(std::vector<long>{1, 2, 3}) == std::vector<long>{1, 4, 9});
  // a serializable function object: its state travels
  CHECK(pool.map(Scale{2.5}, in) == std::vector<double>{2.5, 5.0, 7.5});
  CHECK(pool.map(Scale{-1}, in) == std::vector<double>{-1, -2, -3});
  // captureless lambdas, two of the same signature must not be confused
  CHECK(pool.map([](int x) { return x + 1; }, std::vector<int>{1, 2}) == std::vector<int>{2, 3});
  CHECK(pool.map([](int x) { return x * 10; }, std::vector<int>{1, 2}) == std::vector<int>{10, 20});
}

POOL_TEST("starmap unpacks tuples and pairs", "[starmap]") {
  procpool::Pool pool(test::options<TestType>());
  std::vector<std::tuple<long, long>> tuples{{1, 2}, {3, 4}, {5, 6}};
  CHECK(pool.starmap<add>(tuples) == std::vector<long>{3, 7, 11});
  CHECK(pool.starmap<add>(tuples, 1) == std::vector<long>{3, 7, 11});
  std::vector<std::pair<std::string, int>> pairs{{"ab", 2}, {"c", 3}};
  auto repeated = pool.starmap(
      [](const std::string& s, int n) {
        std::string out;
        for (int i = 0; i < n; ++i) out += s;
        return out;
      },
      pairs);
  CHECK(repeated == std::vector<std::string>{"abab", "ccc"});
}

POOL_TEST("imap yields in input order, lazily", "[imap]") {
  procpool::Pool pool(test::options<TestType>());
  auto in = iota_vec(2000);
  auto expected = serial(square, in);
  for (std::size_t chunksize : {std::size_t{1}, std::size_t{7}, std::size_t{5000}}) {
    CAPTURE(chunksize);
    std::vector<long> got;
    for (long v : pool.imap<square>(in, chunksize)) got.push_back(v);
    CHECK(got == expected);
  }
  std::vector<long> none;
  for (long v : pool.imap<square>(std::vector<long>{})) none.push_back(v);
  CHECK(none.empty());
}

POOL_TEST("imap reads an endless input only as far as it is consumed", "[imap]") {
  procpool::Pool pool(test::options<TestType>({.imap_prefetch = 8}));
  long pulled = 0;
  auto counting = test::counted_iota(pulled);
  long seen = 0;
  for (long v : pool.imap<square>(counting, 2)) {
    CHECK(v == seen * seen);
    if (++seen == 100) break;
  }
  // 8 chunks of 2 ahead of the consumer at most, plus the chunk being read
  CHECK(pulled <= 100 + 8 * 2 + 2);
}

POOL_TEST("an imap left early withdraws the tasks queued in its workers' pipes", "[imap][cancel]") {
  // After many short tasks each worker is sent several at once; leaving the
  // loop must take back those not started, not only those not yet sent.
  test::TempDir dir;
  const std::string log = dir / "ran";
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  std::vector<std::pair<std::string, long>> jobs(200, {log, 0L});
  jobs.insert(jobs.end(), 40, {log, 100L});
  for (long ms : pool.imap<nap_and_mark>(jobs)) {
    if (ms != 0) break;
  }
  pool.close();
  pool.join();  // whatever was not withdrawn has run
  std::ifstream in(log);
  const std::string ran((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  INFO(ran.size() << " slow tasks ran");
  // Those running when the loop left, and the one it saw; 16 ran before.
  CHECK(ran.size() <= 6);
}

POOL_TEST("imap submits 1024 chunks ahead by default, and more for many workers", "[imap]") {
  // 4 * processes * max_tasks_in_flight when that is larger: 4 * 2 * 200
  for (auto [in_flight, ahead] : {std::pair<std::size_t, long>{8, 1024}, {200, 1600}}) {
    CAPTURE(in_flight);
    procpool::Pool pool(test::options<TestType>({.processes = 2, .max_tasks_in_flight = in_flight}));
    long pulled = 0, consumed = 0;
    auto counting = test::counted_iota(pulled);
    for (long v : pool.imap_unordered<square>(counting)) {
      CHECK(v >= 0);
      ++consumed;
      if (pulled > 2 * 2) break;
    }
    // Until a first result is in, two chunks per worker go out (the size of
    // the results is unknown); the next fill, once the results taken were
    // consumed, reads the whole prefetch ahead of them. The result that
    // fill's read yielded is the last one consumed.
    CHECK(pulled == consumed - 1 + ahead);
  }
}

POOL_TEST("an imap whose first item is slow sends the rest once another result is in", "[imap]") {
  // In order, the consumer waits for item 0. The first fill is two chunks
  // per worker; once any result is in, the rest of the prefetch goes out
  // while it waits, rather than once item 0 is done.
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  long pulled = 0;
  auto counting = test::counted_iota(pulled, 40);
  long seen = 0, pulled_at_first = -1;
  for (long v : pool.imap<slow_first>(counting)) {
    if (seen == 0) pulled_at_first = pulled;
    CHECK(v == seen++);
  }
  CHECK(seen == 40);
  CHECK(pulled_at_first == 40);
}

POOL_TEST("adaptive imap keeps 4 * processes * max_tasks_in_flight chunks ahead, not 1024", "[imap]") {
  // Items of 1 ms make adaptive chunks of 1 or 2 items (about 2 ms of work each).
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  long pulled = 0;
  auto counting = test::counted_iota(pulled);
  long seen = 0;
  for (long v : pool.imap_unordered<nap_1ms>(counting, procpool::adaptive)) {
    CHECK(v >= 0);
    if (++seen == 40) break;
  }
  // Taking 40 results refills several times after the first was timed (a
  // batch takes at most 16): what was consumed, then 64 chunks of at most
  // 2 items and the chunk being read. A prefetch of 1024 would have read
  // about a thousand chunks.
  CHECK(pulled <= seen + 4 * 2 * 8 * 2 + 2);
}

POOL_TEST("imap_unordered yields every result exactly once", "[imap]") {
  procpool::Pool pool(test::options<TestType>());
  auto in = iota_vec(3000);
  for (std::size_t chunksize : {std::size_t{1}, std::size_t{7}, std::size_t{5000}}) {
    CAPTURE(chunksize);
    std::vector<long> got;
    for (long v : pool.imap_unordered<square>(in, chunksize)) got.push_back(v);
    std::sort(got.begin(), got.end());
    CHECK(got == serial(square, in));
  }
}

POOL_TEST("a result that throws while imap decodes it loses none of the results after it", "[imap]") {
  // Item 0 comes last and its decoding throws an int (a ProtocolError
  // naming it); results 1-7 wait ready beside it and are taken in the same batch.
  procpool::Pool pool(test::options<TestType>({.processes = 2, .imap_prefetch = 8}));
  for (bool ordered : {true, false}) {
    CAPTURE(ordered);
    auto in = iota_vec(8);
    auto results = ordered ? pool.imap<touchy_slow_first>(in) : pool.imap_unordered<touchy_slow_first>(in);
    std::vector<long> got;
    int thrown = 0;
    for (;;) {
      try {
        auto v = results.next(std::chrono::seconds(20));
        if (!v) break;
        got.push_back(v->v);
      } catch (const procpool::ProtocolError& e) {
        CHECK_THAT(e.what(), Catch::Contains("input #0") && Catch::Contains("could not be decoded (int)"));
        ++thrown;
      }
    }
    std::sort(got.begin(), got.end());
    CHECK(thrown == 1);
    CHECK(got == std::vector<long>{1, 2, 3, 4, 5, 6, 7});
  }
}

POOL_TEST("an imap whose pool is closed while it reads ends with PoolNotRunning after what was sent", "[imap]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2, .imap_prefetch = 8}));
  auto results = pool.imap<square>(tv::iota(0L, 1000L), 1);
  CHECK(results.next() == 0);
  pool.close();
  long next = 1;
  bool refused = false;
  for (;;) {
    try {
      auto v = results.next(std::chrono::seconds(20));
      if (!v) break;
      CHECK(*v == next * next);
      ++next;
    } catch (const procpool::PoolNotRunning&) {
      refused = true;
    }
  }
  CHECK(refused);
  CHECK(next > 1);     // what was sent before the close came
  CHECK(next < 1000);  // and nothing after it
  pool.join();
}

POOL_TEST("imap's next() returns nullopt at the end", "[imap]") {
  procpool::Pool pool(test::options<TestType>());
  auto results = pool.imap<square>(std::vector<long>{2, 3});
  CHECK(results.next() == 4);
  CHECK(results.next(std::chrono::seconds(30)) == 9);
  CHECK_FALSE(results.next().has_value());
}

POOL_TEST("apply and apply_async run one call", "[apply]") {
  procpool::Pool pool(test::options<TestType>());
  CHECK(pool.apply<square>(7) == 49);
  CHECK(pool.apply<add>(2, 40) == 42);
  CHECK(pool.apply([](const std::string& s, int n) { return s.size() * static_cast<std::size_t>(n); },
                   std::string("abc"), 3) == 9);
  CHECK(pool.apply(Scale{3}, 2.0) == 6.0);
  // A C string travels as std::string: a pointer cannot cross processes.
  CHECK(pool.apply([](const std::string& s) { return s.size(); }, "literal") == 7);
  procpool::Pool with_init(test::options<TestType>({.initializer = procpool::initializer<set_prefix>("pre-")}));
  CHECK(with_init.apply<prefixed>(std::string("x")) == "pre-x");
  procpool::AsyncResult<long> a = pool.apply_async<square>(8);
  CHECK(a.get() == 64);
  CHECK(a.ready());
  CHECK(a.successful());
  CHECK(a.get() == 64);  // get() can be called again
}

POOL_TEST("void functions return monostate from map and void from apply", "[apply]") {
  procpool::Pool pool(test::options<TestType>());
  auto results = pool.map([](int) {}, std::vector<int>{1, 2, 3});
  CHECK(results.size() == 3);
  procpool::AsyncResult<void> done = pool.apply_async([](int) {}, 1);
  done.get();
  CHECK(done.successful());
}

POOL_TEST("map_async returns at once and delivers in order", "[map_async]") {
  procpool::Pool pool(test::options<TestType>());
  auto in = iota_vec(5000);
  procpool::AsyncResult<std::vector<long>> m = pool.map_async<square>(in, 10);
  m.wait();
  CHECK(m.ready());
  CHECK(m.get() == serial(square, in));
  auto s = pool.starmap_async<add>(std::vector<std::tuple<long, long>>{{1, 1}});
  CHECK(s.get() == std::vector<long>{2});
}

namespace map_unsized_test {

long square_of(long x) { return x * x; }
long sum_of(long x, long y) { return x + y; }

/// An input range that is not a view and has no size: a user's generator.
struct Countdown {
  long from = 0;
  struct iterator {
    using value_type = long;
    using difference_type = std::ptrdiff_t;
    long at = 0;
    long operator*() const { return at; }
    iterator& operator++() {
      --at;
      return *this;
    }
    void operator++(int) { --at; }
    bool operator==(const iterator& other) const { return at == other.at; }
  };
  iterator begin() const { return {from}; }
  iterator end() const { return {0}; }
};

}  // namespace map_unsized_test

POOL_TEST("the map family takes inputs that have no size and are not views", "[map][ranges]") {
  using namespace map_unsized_test;
  procpool::Pool pool(test::options<TestType>());
  std::forward_list<long> list{1, 2, 3, 4};
  const std::vector<long> squares{1, 4, 9, 16};
  CHECK(pool.map<square_of>(list) == squares);
  CHECK(pool.map<square_of>(list, {.chunksize = procpool::adaptive}) == squares);
  CHECK(pool.map<sum_of>(procpool::zip(list, Countdown{4})) == std::vector<long>{5, 5, 5, 5});
  std::vector<long> got;
  for (long v : pool.imap<square_of>(Countdown{3})) got.push_back(v);
  CHECK(got == std::vector<long>{9, 4, 1});
  got.clear();
  for (long v : pool.imap_unordered<square_of>(std::forward_list<long>{5, 6})) got.push_back(v);
  std::ranges::sort(got);
  CHECK(got == std::vector<long>{25, 36});
}

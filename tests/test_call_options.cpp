// Per-call settings (procpool::CallOptions): chunksize, retries and task
// timeouts for one call, progress reports; and imap's byte bound.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <numeric>
#include <ranges>
#include <thread>

#include "common.hpp"

namespace call_options_test {

using namespace std::chrono_literals;

long twice(long x) { return 2 * x; }

long sleep_then_twice(long x) {
  if (x == 3) std::this_thread::sleep_for(60s);
  return 2 * x;
}

long fail_on_two(long x) {
  if (x == 2) throw std::runtime_error("two");
  return x;
}

std::size_t length(const std::string& s) { return s.size(); }

/// Progress reports as they arrive: (done, total) pairs.
struct Recorder {
  std::shared_ptr<std::mutex> mutex = std::make_shared<std::mutex>();
  std::shared_ptr<std::vector<std::pair<std::size_t, std::optional<std::size_t>>>> seen =
      std::make_shared<std::vector<std::pair<std::size_t, std::optional<std::size_t>>>>();
  procpool::ProgressCallback callback() const {
    return [m = mutex, s = seen](std::size_t done, std::optional<std::size_t> total) {
      std::lock_guard lock(*m);
      s->emplace_back(done, total);
    };
  }
  std::vector<std::pair<std::size_t, std::optional<std::size_t>>> reports() const {
    std::lock_guard lock(*mutex);
    return *seen;
  }
};

/// Reports only ever grow, and the last says all `n` are done.
void check_reports(const Recorder& recorder, std::size_t n, std::optional<std::size_t> total) {
  auto reports = recorder.reports();
  REQUIRE(!reports.empty());
  for (std::size_t i = 1; i < reports.size(); ++i) CHECK(reports[i].first > reports[i - 1].first);
  CHECK(reports.back().first == n);
  for (auto& [done, t] : reports) CHECK(t == total);
}

}  // namespace call_options_test

namespace call_options_test {

POOL_TEST("CallOptions sets the chunksize of one call", "[call]") {
  procpool::Pool pool(test::options<TestType>());
  std::vector<long> in(50);
  std::iota(in.begin(), in.end(), 0L);
  std::vector<long> want;
  for (long x : in) want.push_back(2 * x);
  CHECK(pool.map<twice>(in, {.chunksize = 7}) == want);
  CHECK(pool.starmap([](long a, long b) { return a + b; }, std::vector<std::tuple<long, long>>{{1, 2}, {3, 4}},
                     {.chunksize = 2}) == std::vector<long>{3, 7});
  std::vector<long> got;
  for (long v : pool.imap<twice>(in, {.chunksize = 5})) got.push_back(v);
  CHECK(got == want);
  CHECK(pool.map_async<twice>(in, {.chunksize = 3}).get() == want);
}

POOL_TEST("a call's task_timeout overrides the pool's", "[call][timeout]") {
  procpool::Pool pool(test::options<TestType>());  // no timeout for the pool
  auto start = std::chrono::steady_clock::now();
  auto error = test::thrown<procpool::TaskTimeout>([&] { pool.apply<sleep_then_twice>({.task_timeout = 200ms}, 3L); });
  CHECK_THAT(error.what(), Catch::Contains("200 ms"));
  CHECK(std::chrono::steady_clock::now() - start < 20s);
  // map: only the item that hangs fails.
  std::vector<std::string> outcomes;
  auto results = pool.imap<sleep_then_twice>(std::vector<long>{1, 2, 3, 4}, {.task_timeout = 200ms});
  for (auto it = results.begin(); outcomes.size() < 4; ++it) {
    try {
      outcomes.push_back(std::to_string(*it));
    } catch (const procpool::TaskTimeout&) {
      outcomes.push_back("TaskTimeout");
    }
  }
  CHECK(outcomes == std::vector<std::string>{"2", "4", "TaskTimeout", "8"});
  // Other calls keep the pool's setting (none): a plain call is not limited.
  CHECK(pool.apply<twice>(5L) == 10);
  // And a call can lift the pool's limit.
  procpool::Pool strict(test::options<TestType>({.task_timeout = 100ms}));
  CHECK(strict.apply(
            [](long ms) {
              std::this_thread::sleep_for(std::chrono::milliseconds(ms));
              return ms;
            },
            procpool::CallOptions{.task_timeout = 0ms}, 400L) == 400);
}

POOL_TEST("timeouts too long for the clock mean no limit; negative task timeouts are refused", "[call][timeout]") {
  // milliseconds::max() and the like, "wait for ever", overflowed the
  // clock: every task was stopped at once, and every wait timed out.
  auto nap = [](long ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return ms;
  };
  procpool::Pool pool(test::options<TestType>({.processes = 2, .task_timeout = std::chrono::milliseconds::max()}));
  CHECK(pool.apply(nap, 150L) == 150);
  CHECK(pool.apply(nap, procpool::CallOptions{.task_timeout = std::chrono::milliseconds::max()}, 150L) == 150);
  auto result = pool.apply_async(nap, 150L);
  CHECK(result.wait(std::chrono::nanoseconds::max()));
  CHECK(pool.apply_async(nap, 150L).get(std::chrono::hours::max()) == 150);
  auto results = pool.imap(nap, std::vector<long>{150, 10});
  CHECK(results.next(std::chrono::seconds::max()) == 150);
  CHECK(results.next(std::chrono::duration<double>(1e300)) == 10);
  CHECK(procpool::wait(std::vector{pool.apply_async(nap, 150L)}, std::chrono::hours::max()).not_done.empty());
  // A negative timeout is no "no limit": it is refused, saying what to use.
  auto bad_pool = test::thrown<std::invalid_argument>(
      [&] { procpool::Pool refused(test::options<TestType>({.task_timeout = std::chrono::milliseconds(-5)})); });
  CHECK_THAT(bad_pool.what(), Catch::Contains("Options::task_timeout is negative (-5 ms)"));
  auto bad_call =
      test::thrown<std::invalid_argument>([&] { pool.apply(nap, procpool::CallOptions{.task_timeout = -1ms}, 1L); });
  CHECK_THAT(bad_call.what(), Catch::Contains("CallOptions::task_timeout is negative (-1 ms)"));
  CHECK(pool.apply(nap, 1L) == 1);  // nothing was lost
}

POOL_TEST("a call's retries override the pool's", "[call][retries]") {
  test::TempDir dir;
  procpool::Pool pool(test::options<TestType>());  // no retries for the pool
  std::vector<std::tuple<std::string, long>> in;
  for (long x = 0; x < 4; ++x) in.emplace_back(dir.path(), x);
  CHECK(pool.starmap<test::crash_once>(in, {.chunksize = 1, .retries = 1}) == std::vector<long>{0, 1, 2, 3});
  CHECK(dir.files().size() == 4);  // each crashed once, then ran again
  test::TempDir fresh;
  CHECK(pool.apply<test::crash_once>({.retries = 1}, fresh.path(), 7L) == 7);
  // A call without the override keeps the pool's: one crash is final.
  test::TempDir strict;
  CHECK_THROWS_AS(pool.apply<test::crash_once>(strict.path(), 1L), procpool::WorkerLost);
}

POOL_TEST("progress is reported as chunks complete, failures included", "[call][progress]") {
  procpool::Pool pool(test::options<TestType>());
  std::vector<long> in(100);
  std::iota(in.begin(), in.end(), 0L);
  {
    Recorder recorder;
    pool.map<twice>(in, {.chunksize = 8, .progress = recorder.callback()});
    check_reports(recorder, 100, 100);
    CHECK(recorder.reports().size() == 13);  // one per chunk
  }
  {
    Recorder recorder;
    CHECK_THROWS_AS(pool.map<fail_on_two>(in, {.chunksize = 1, .progress = recorder.callback()}),
                    procpool::RemoteError);
    check_reports(recorder, 100, 100);  // the failed item is done too
  }
  {
    Recorder recorder;  // imap over a sized input knows its total
    std::size_t n = 0;
    for ([[maybe_unused]] long v : pool.imap_unordered<twice>(in, {.progress = recorder.callback()})) ++n;
    CHECK(n == 100);
    check_reports(recorder, 100, 100);
  }
  {
    Recorder recorder;  // over a generator it does not
    auto gen = tv::iota(0L, 30L) | tv::filter([](long) { return true; });
    std::size_t n = 0;
    for ([[maybe_unused]] long v : pool.imap<twice>(gen, {.chunksize = 4, .progress = recorder.callback()})) ++n;
    CHECK(n == 30);
    check_reports(recorder, 30, std::nullopt);
  }
}

POOL_TEST("a progress callback that throws is reported and the call goes on", "[call][progress]") {
  procpool::Pool pool(test::options<TestType>());
  auto boom = [](std::size_t, std::optional<std::size_t>) { throw std::runtime_error("bar broke"); };
  CHECK(pool.map<twice>(std::vector<long>{1, 2, 3}, {.chunksize = 1, .progress = boom}) == std::vector<long>{2, 4, 6});
  CHECK(pool.apply<twice>(1L) == 2);
}

POOL_TEST("imap reads no further ahead than imap_prefetch_bytes allow", "[call][backpressure]") {
  constexpr std::size_t item = std::size_t{4} << 20;  // 4 MiB strings
  procpool::Pool pool(test::options<TestType>({.imap_prefetch_bytes = std::size_t{16} << 20}));
  std::atomic<std::size_t> produced{0};
  auto items = tv::iota(0, 40) | tv::transform([&](int) {
                 ++produced;
                 return std::string(item, 'x');
               });
  std::size_t consumed = 0, most_ahead = 0;
  for (std::size_t n : pool.imap<length>(items)) {
    CHECK(n == item);
    ++consumed;
    most_ahead = std::max(most_ahead, produced.load() - consumed);
  }
  CHECK(consumed == 40);
  // 16 MiB of 4 MiB tasks: about 4 in flight (chunk counts alone would allow 32).
  CHECK(most_ahead <= 6);
}

std::string mebibyte(int) { return std::string(std::size_t{1} << 20, 'r'); }

POOL_TEST("imap keeps its unconsumed results within imap_prefetch_bytes", "[call][backpressure]") {
  // Small tasks, 1 MiB results: the bytes are the results'. The first fill
  // read the whole prefetch (1024 chunks, 1 GiB of results to come).
  procpool::Pool pool(test::options<TestType>({.processes = 2, .imap_prefetch_bytes = std::size_t{16} << 20}));
  std::atomic<std::size_t> produced{0};
  auto items = tv::iota(0, 100000) | tv::transform([&](int i) {
                 ++produced;
                 return i;
               });
  std::size_t consumed = 0, most_ahead = 0;
  for (const std::string& s : pool.imap_unordered<mebibyte>(items)) {
    CHECK(s.size() == std::size_t{1} << 20);
    // A slow consumer: the results arrive before it takes them.
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    most_ahead = std::max(most_ahead, produced.load() - ++consumed);
    if (consumed == 60) break;
  }
  // 16 results of 1 MiB ahead, the few taken but not yet yielded (a quarter
  // of the bound), and the one being read.
  CHECK(most_ahead <= 16 + 4 + 1);
}

long nap_ms(long ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return ms;
}
long fail_on_seven(long x) {
  if (x == 7) throw std::runtime_error("seven");
  return x;
}

POOL_TEST("adaptive chunking batches tiny tasks and sends long ones alone", "[call][adaptive]") {
  procpool::Pool pool(test::options<TestType>());
  {
    // Tiny tasks: after the first timed chunks, chunks of many items.
    std::vector<long> in(20000);
    std::iota(in.begin(), in.end(), 0L);
    Recorder recorder;
    auto out = pool.map<twice>(in, {.chunksize = procpool::adaptive, .progress = recorder.callback()});
    REQUIRE(out.size() == in.size());
    for (std::size_t i = 0; i < in.size(); ++i) CHECK(out[i] == 2 * in[i]);
    check_reports(recorder, 20000, 20000);
    CHECK(recorder.reports().size() < 500);  // chunksize 1 would be 20000 chunks
  }
  {
    // Tasks of 5 ms, over the 2 ms a chunk aims at: one item per chunk.
    Recorder recorder;
    auto out =
        pool.map<nap_ms>(std::vector<long>(12, 5L), {.chunksize = procpool::adaptive, .progress = recorder.callback()});
    CHECK(out == std::vector<long>(12, 5L));
    CHECK(recorder.reports().size() == 12);
  }
  {
    // imap over a generator of unknown length, in order.
    auto gen = tv::iota(0L, 5000L) | tv::filter([](long) { return true; });
    long expect = 0;
    for (long v : pool.imap<twice>(gen, {.chunksize = procpool::adaptive})) {
      CHECK(v == 2 * expect);
      ++expect;
    }
    CHECK(expect == 5000);
  }
  // Errors: every item runs, then the first failed one's error, as map does.
  std::vector<long> in(100);
  std::iota(in.begin(), in.end(), 0L);
  auto error =
      test::thrown<procpool::RemoteError>([&] { pool.map<fail_on_seven>(in, {.chunksize = procpool::adaptive}); });
  CHECK(error.input_index() == 7);
}

}  // namespace call_options_test

// What concurrent.futures users reach for: AsyncResult::cancel(),
// cancelled(), exception(), add_done_callback(), procpool::as_completed,
// procpool::wait, apply_async's callbacks, braced lists and several inputs
// zipped together.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <future>
#include <list>
#include <mutex>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"

using namespace std::chrono_literals;

// A named namespace: a worker finds a task by its type's name, and other
// test files have helpers of the same names.
namespace futures_test {

long sqr(long x) { return x * x; }
long add(long x, long y) { return x + y; }
std::string label(std::string name, long n) { return name + "=" + std::to_string(n); }

long fail_on_odd(long x) {
  if (x % 2 != 0) throw std::invalid_argument("odd");
  return x;
}

/// Counts its run in `counters` (shared with the test), then takes `ms`.
long counted(procpool::SharedMemory counters, long i, int ms) {
  std::atomic_ref<int>(counters.as<int>()[static_cast<std::size_t>(i)]).fetch_add(1);
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return i;
}

long nap(long ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return ms;
}

}  // namespace futures_test

namespace futures_test {

POOL_TEST("cancel() withdraws tasks not yet started, exactly once, and leaves the others to run", "[futures][cancel]") {
  constexpr long n = 1000;
  procpool::SharedMemory counters(n * sizeof(int));
  std::fill(counters.as<int>().begin(), counters.as<int>().end(), 0);
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  std::vector<procpool::AsyncResult<long>> results;
  for (long i = 0; i < n; ++i) results.push_back(pool.apply_async<counted>(counters, i, 10));
  // The first 10 to finish.
  int finished = 0;
  for (const auto& r : procpool::as_completed(results)) {
    CHECK(r.get() >= 0);
    if (++finished == 10) break;
  }
  std::vector<bool> withdrawn;
  for (auto& r : results) withdrawn.push_back(r.cancel());
  pool.close();
  pool.join();
  std::size_t cancelled = 0;
  for (long i = 0; i < n; ++i) {
    const auto k = static_cast<std::size_t>(i);
    INFO("task " << i);
    if (withdrawn[k]) {
      ++cancelled;
      CHECK(results[k].cancelled());
      CHECK(results[k].ready());
      CHECK(counters.as<int>()[k] == 0);  // it never ran
      CHECK_THROWS_AS(results[k].get(), procpool::Cancelled);
      CHECK(results[k].exception() != nullptr);
    } else {
      CHECK_FALSE(results[k].cancelled());
      CHECK(counters.as<int>()[k] == 1);  // it ran, once
      CHECK(results[k].get() == i);
    }
  }
  CHECK(cancelled > n / 2);  // 10 ms each on 2 workers: most had not started
  CHECK(cancelled < static_cast<std::size_t>(n) - 10);
}

POOL_TEST("cancel() on a running or finished task returns false and changes nothing", "[futures][cancel]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  auto done = pool.apply_async<sqr>(4L);
  CHECK(done.get() == 16);
  CHECK_FALSE(done.cancel());
  CHECK_FALSE(done.cancelled());
  CHECK(done.get() == 16);
  auto running = pool.apply_async<nap>(300L);
  // Wait until it runs: a second task on the other worker finishes first.
  CHECK(pool.apply<sqr>(3L) == 9);
  std::this_thread::sleep_for(50ms);
  const bool withdrawn = running.cancel();
  if (!withdrawn) CHECK(running.get() == 300);
}

POOL_TEST("cancel() on map_async withdraws its chunks not started; get() throws Cancelled", "[futures][cancel]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  auto r = pool.map_async<nap>(std::vector<long>(40, 20L), 1);
  std::this_thread::sleep_for(30ms);
  CHECK(r.cancel());
  CHECK(r.cancelled());
  CHECK(r.ready());
  CHECK_THROWS_AS(r.get(), procpool::Cancelled);
  CHECK_THROWS_AS(r.get(), procpool::Error);
  CHECK_FALSE(r.successful());
  // The pool goes on.
  CHECK(pool.map<sqr>(std::vector<long>{1, 2, 3}) == std::vector<long>{1, 4, 9});
}

POOL_TEST("cancel() after some of a map_async's tasks ran says how many never ran", "[futures][cancel]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  std::atomic<std::size_t> done{0};
  auto r = pool.map_async<nap>(std::vector<long>(40, 20L),
                               {.chunksize = 1, .progress = [&](std::size_t n, auto) { done = n; }});
  while (done.load() < 2) std::this_thread::sleep_for(1ms);
  REQUIRE(r.cancel());
  const auto cancelled = test::thrown<procpool::Cancelled>([&] { r.get(); });
  CHECK_THAT(cancelled.what(),
             Catch::Matches("procpool: the map_async call was cancelled: [0-9]+ of its 40 tasks had not "
                            "started and never ran, and the results of the others are dropped"));
}

POOL_TEST("exception() gives a finished result's error without throwing", "[futures]") {
  procpool::Pool pool(test::options<TestType>());
  auto good = pool.apply_async<fail_on_odd>(2L);
  auto bad = pool.apply_async<fail_on_odd>(3L);
  CHECK(good.exception() == nullptr);
  auto error = bad.exception();
  REQUIRE(error != nullptr);
  CHECK_THROWS_AS(std::rethrow_exception(error), procpool::RemoteError);
  CHECK_THROWS_AS(bad.get(), procpool::RemoteError);
}

POOL_TEST("add_done_callback runs once the result is ready, or at once, and may call back into the pool",
          "[futures][callbacks]") {
  procpool::Pool pool(test::options<TestType>());
  std::promise<long> seen;
  auto r = pool.apply_async<nap>(50L);
  r.add_done_callback([&](const procpool::AsyncResult<long>& done) {
    // Back into the pool, from the callback.
    seen.set_value(done.get() + pool.apply<sqr>(2L));
  });
  auto future = seen.get_future();
  REQUIRE(future.wait_for(30s) == std::future_status::ready);
  CHECK(future.get() == 54);
  // Already ready: at once, on this thread.
  bool called = false;
  r.add_done_callback([&](const procpool::AsyncResult<long>&) { called = true; });
  CHECK(called);
  // A cancelled result's callbacks run too.
  auto blocker = pool.map_async<nap>(std::vector<long>(8, 100L), 1);
  auto later = pool.apply_async<sqr>(5L);
  std::promise<bool> cancelled_seen;
  later.add_done_callback([&](const procpool::AsyncResult<long>& done) { cancelled_seen.set_value(done.cancelled()); });
  if (later.cancel()) {
    auto f = cancelled_seen.get_future();
    REQUIRE(f.wait_for(30s) == std::future_status::ready);
    CHECK(f.get());
  }
  blocker.wait();
}

POOL_TEST("add_done_callback on a result wait() saw ready runs at once, on this thread", "[futures][callbacks]") {
  // The caller's wait() returned once the last chunk was in, a moment before
  // the completing thread had made its done callbacks run: one added then
  // was queued, and ran later on the callback thread.
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  int late = 0;
  for (int round = 0; round < 300; ++round) {
    auto r = round % 2 == 0 ? pool.apply_async<sqr>(2L) : pool.apply_async<sqr>(2L, procpool::callbacks([](long) {}));
    r.wait();
    REQUIRE(r.ready());
    std::atomic<bool> ran{false};
    r.add_done_callback([&](const procpool::AsyncResult<long>&) { ran = true; });
    late += !ran;
    while (!ran) std::this_thread::yield();  // `ran` must outlive the callback
  }
  CHECK(late == 0);
}

POOL_TEST("as_completed yields results in finishing order, and times out", "[futures][as_completed]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  std::vector<procpool::AsyncResult<long>> results;
  for (long ms : {400L, 10L, 200L, 50L}) results.push_back(pool.apply_async<nap>(ms));
  std::vector<long> order;
  for (const auto& r : procpool::as_completed(results)) order.push_back(r.get());
  CHECK(order.size() == 4);
  CHECK(std::is_permutation(order.begin(), order.end(), std::vector<long>{400, 10, 200, 50}.begin()));
  CHECK(order.front() == 10);
  CHECK(order.back() == 400);
  // A list works as well as a vector; a timeout that passes first throws.
  std::list<procpool::AsyncResult<long>> slow{pool.apply_async<nap>(2000L)};
  CHECK_THROWS_AS(
      [&] {
        for (const auto& r : procpool::as_completed(slow, 50ms)) (void)r;
      }(),
      procpool::TimeoutError);
}

POOL_TEST("wait returns done and not_done positions as concurrent.futures.wait does", "[futures][wait]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  std::vector<procpool::AsyncResult<long>> results = {pool.apply_async<nap>(1000L), pool.apply_async<nap>(10L)};
  auto [done, not_done] = procpool::wait(results, 30s, procpool::ReturnWhen::first_completed);
  CHECK(done == std::vector<std::size_t>{1});
  CHECK(not_done == std::vector<std::size_t>{0});
  auto all = procpool::wait(results, 30s, procpool::ReturnWhen::all_completed);
  CHECK(all.done == std::vector<std::size_t>{0, 1});
  CHECK(all.not_done.empty());
  // first_exception: returns at the first failure, or when all are done.
  std::vector<procpool::AsyncResult<long>> mixed = {pool.apply_async<nap>(2000L), pool.apply_async<fail_on_odd>(1L)};
  auto failed = procpool::wait(mixed, 30s, procpool::ReturnWhen::first_exception);
  CHECK(failed.done == std::vector<std::size_t>{1});
  CHECK(failed.not_done == std::vector<std::size_t>{0});
  // A timeout returns what is done by then.
  auto partial = procpool::wait(mixed, 10ms);
  CHECK(partial.not_done == std::vector<std::size_t>{0});
  CHECK(procpool::wait(mixed).not_done.empty());
}

POOL_TEST("apply_async takes a callback and an error_callback", "[futures][callbacks]") {
  procpool::Pool pool(test::options<TestType>());
  std::promise<long> value;
  std::promise<std::string> error;
  auto ok = pool.apply_async<sqr>(7L, procpool::callbacks([&](const long& v) { value.set_value(v); }));
  auto bad = pool.apply_async<fail_on_odd>(3L, procpool::callbacks(nullptr, [&](const procpool::Error& e) {
                                             error.set_value(e.what());
                                           }));
  ok.wait();
  bad.wait();
  // Run before the result is ready, as map_async's are.
  CHECK(value.get_future().wait_for(0s) == std::future_status::ready);
  CHECK(ok.get() == 49);
  auto f = error.get_future();
  REQUIRE(f.wait_for(0s) == std::future_status::ready);
  CHECK_THAT(f.get(), Catch::Contains("odd"));
}

POOL_TEST("the map family takes a braced list", "[futures][input]") {
  procpool::Pool pool(test::options<TestType>());
  CHECK(pool.map<sqr>({1, 2, 3}) == std::vector<long>{1, 4, 9});
  CHECK(pool.map<sqr>({1, 2, 3}, 2) == std::vector<long>{1, 4, 9});
  CHECK(pool.map_async<sqr>({4, 5}).get() == std::vector<long>{16, 25});
  std::vector<long> lazy;
  for (long v : pool.imap<sqr>({6, 7})) lazy.push_back(v);
  CHECK(lazy == std::vector<long>{36, 49});
  long total = 0;
  for (long v : pool.imap_unordered<sqr>({1, 2})) total += v;
  CHECK(total == 5);
}

POOL_TEST("several inputs zipped together, shortest first, lazily for imap", "[futures][zip]") {
  procpool::Pool pool(test::options<TestType>());
  std::vector<long> xs{1, 2, 3, 4};
  std::vector<long> ys{10, 20, 30};
  CHECK(pool.map<add>(procpool::zip(xs, ys)) == std::vector<long>{11, 22, 33});
  CHECK(pool.starmap<add>(procpool::zip(xs, ys), 2) == std::vector<long>{11, 22, 33});
  CHECK(pool.map_async<add>(procpool::zip(ys, xs)).get() == std::vector<long>{11, 22, 33});
  std::vector<std::string> names{"a", "b"};
  CHECK(pool.map<label>(procpool::zip(names, std::vector<long>{1, 2, 3})) == std::vector<std::string>{"a=1", "b=2"});
  // Lazy: an endless input is read only as far as needed.
  long read = 0;
  auto counting = tv::iota(0L) | tv::transform([&read](long x) {
                    ++read;
                    return x;
                  });
  auto lazy = pool.imap<add>(procpool::zip(counting, tv::iota(100L)), 1);
  std::vector<long> first;
  for (long v : lazy) {
    first.push_back(v);
    if (first.size() == 5) break;
  }
  CHECK(first == std::vector<long>{100, 102, 104, 106, 108});
  CHECK(read < 5000);
}

}  // namespace futures_test

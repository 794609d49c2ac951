// Callbacks (map_async's callback and error_callback, progress callbacks,
// on_worker_output): they run before their call's result is ready, and they
// may call any method of their pool, which works or throws a clear error:
// never a deadlock, an abort or a hang.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"

using namespace std::chrono_literals;

// A named namespace: a worker finds a task by its type's name, and other
// test files have helpers of the same names.
namespace callbacks_test {

long sq(long x) { return x * x; }

long add(long a, long b) { return a + b; }

long nap(long ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return ms;
}

long reject_three(long x) {
  if (x == 3) throw std::invalid_argument("three");
  return x;
}

long print_and_return(long x) {
  std::printf("line %ld\n", x);
  std::fflush(stdout);
  return x;
}

using test::iota_vec;
using test::squares;

}  // namespace callbacks_test

namespace callbacks_test {

POOL_TEST("map_async's callbacks run before wait() and get() return", "[callbacks]") {
  procpool::Pool pool(test::options<TestType>());
  for (int round = 0; round < 10; ++round) {
    std::vector<long> out;  // as Python's callback=out.extend
    auto r = pool.map_async<sq>(iota_vec(20), 0, [&out](const std::vector<long>& v) {
      std::this_thread::sleep_for(20ms);  // a slow callback: the caller must still see what it did
      out.insert(out.end(), v.begin(), v.end());
    });
    r.wait();
    CHECK(out == squares(20));
    CHECK(r.ready());
  }
  for (int round = 0; round < 5; ++round) {
    std::string seen;
    auto r = pool.map_async<reject_three>(iota_vec(6), 1, nullptr, [&seen](const procpool::Error& e) {
      std::this_thread::sleep_for(20ms);
      seen = e.what();
    });
    CHECK_THROWS_AS(r.get(), procpool::RemoteError);
    CHECK_THAT(seen, Catch::Contains("map_async input #3"));
  }
}

POOL_TEST("map_async and starmap_async of an empty input run their callback", "[callbacks]") {
  procpool::Pool pool(test::options<TestType>());
  std::atomic<int> calls{0};
  auto r = pool.map_async<sq>(std::vector<long>{}, 0, [&calls](const std::vector<long>& v) {
    CHECK(v.empty());
    ++calls;
  });
  CHECK(r.wait(30s));
  CHECK(r.get().empty());
  CHECK(calls == 1);
  auto only_errors = pool.map_async<sq>(std::vector<long>{}, 0, nullptr, [](const procpool::Error&) { FAIL(); });
  CHECK(only_errors.wait(30s));
  CHECK(only_errors.successful());
  auto star =
      pool.starmap_async<add>(std::vector<std::pair<long, long>>{}, 0, [&calls](const std::vector<long>&) { ++calls; });
  CHECK(star.wait(30s));
  CHECK(calls == 2);
  std::vector<procpool::AsyncResult<std::vector<long>>> all;
  all.push_back(pool.map_async<sq>(std::vector<long>{}, 0, [](const std::vector<long>&) {}));
  all.push_back(pool.map_async<sq>(std::vector<long>{}));  // no callbacks
  CHECK(procpool::wait(all, 30s).not_done.empty());
  std::size_t yielded = 0;
  for (const auto& each : procpool::as_completed(all, 30s)) yielded += each.get().size() + 1;
  CHECK(yielded == 2);
  std::promise<void> done;
  all.back().add_done_callback([&done](const auto&) { done.set_value(); });
  CHECK(done.get_future().wait_for(30s) == std::future_status::ready);
  pool.close();
  CHECK_THROWS_AS(pool.map_async<sq>(std::vector<long>{}, 0, [](const std::vector<long>&) {}),
                  procpool::PoolNotRunning);
}

POOL_TEST("an empty map_async whose callback cannot have the callback thread runs it on the caller's",
          "[callbacks][reentrant]") {
  procpool::Pool pool(test::options<TestType>());
  CHECK(pool.map<sq>(iota_vec(4)) == squares(4));  // the pool's own threads and workers are up
  bool ran = false;
  procpool::detail::failing_thread_starts() = 1;  // the callback thread, started by this call
  auto r = pool.map_async<sq>(std::vector<long>{}, 0, [&](const std::vector<long>&) {
    ran = true;
    pool.close();  // from the caller's own thread: no stream of the call may be open
    pool.join();
  });
  procpool::detail::failing_thread_starts() = 0;
  CHECK(ran);
  CHECK(r.ready());
  CHECK(r.get().empty());
}

POOL_TEST("a map_async callback may call apply, map and apply_async on its pool", "[callbacks][reentrant]") {
  procpool::Pool pool(test::options<TestType>());
  long applied = 0;
  std::vector<long> mapped;
  long nested = 0;
  auto r = pool.map_async<sq>(iota_vec(10), 0, [&](const std::vector<long>&) {
    applied = pool.apply<sq>(7L);
    mapped = pool.map<sq>(iota_vec(30), 4);
    // A result whose own callback queues behind this one: the wait runs it.
    std::atomic<bool> inner_called{false};
    auto inner = pool.apply_async<sq>(9L);
    auto inner_map = pool.map_async<sq>(iota_vec(3), 0, [&](const std::vector<long>&) { inner_called = true; });
    nested = inner.get() + inner_map.get().at(2);
    CHECK(inner_called);
  });
  REQUIRE(r.wait(60s));
  CHECK(applied == 49);
  CHECK(mapped == squares(30));
  CHECK(nested == 81 + 4);
  // The pool is unharmed: later calls and the destructor work.
  CHECK(pool.map<sq>(iota_vec(50), 3) == squares(50));
}

POOL_TEST("a progress callback may call back into its pool", "[callbacks][reentrant][progress]") {
  procpool::Pool pool(test::options<TestType>());
  std::atomic<long> inner{0};
  auto values =
      pool.map<sq>(iota_vec(8), {.chunksize = 2, .progress = [&](std::size_t done, std::optional<std::size_t>) {
                                   if (done == 4) inner = pool.apply<sq>(5L);
                                 }});
  CHECK(values == squares(8));
  CHECK(inner == 25);
}

POOL_TEST("terminate() and close() from a callback end the pool cleanly", "[callbacks][reentrant]") {
  SECTION("terminate from a callback") {
    procpool::Pool pool(test::options<TestType>({.processes = 3}));  // two busy, one for the callback's call
    auto slow = pool.map_async(
        [](long x) {
          std::this_thread::sleep_for(std::chrono::seconds(x));
          return x;
        },
        std::vector<long>{30, 30}, 1);
    auto r = pool.map_async<sq>(iota_vec(3), 3, [&pool](const std::vector<long>&) { pool.terminate(); });
    REQUIRE(r.wait(30s));
    CHECK(r.get() == squares(3));
    CHECK_THROWS_AS(slow.get(), procpool::PoolNotRunning);
    CHECK_THROWS_AS(pool.map<sq>(iota_vec(3)), procpool::PoolNotRunning);
  }
  SECTION("terminate from an error_callback, racing the destructor") {
    for (int round = 0; round < 5; ++round) {
      std::atomic<int> called{0};
      {
        procpool::Pool pool(test::options<TestType>());
        pool.map_async<reject_three>(iota_vec(6), 1, nullptr, [&](const procpool::Error&) {
          ++called;
          pool.terminate();
        });
      }  // the destructor terminates; the error_callback runs while the pool is still whole
      CHECK(called == 1);
    }
  }
  SECTION("close and join from a callback") {
    procpool::Pool pool(test::options<TestType>());
    std::atomic<bool> joined{false};
    auto r = pool.map_async<sq>(iota_vec(4), 0, [&](const std::vector<long>&) {
      pool.close();
      pool.join();
      joined = true;
    });
    REQUIRE(r.wait(30s));
    CHECK(joined);
    CHECK_THROWS_AS(pool.apply<sq>(2L), procpool::PoolNotRunning);
  }
}

POOL_TEST("a callback may terminate, or close and join, its pool while the caller is in join()",
          "[callbacks][reentrant]") {
  // join() held its lock while it waited for the callbacks: a callback's
  // terminate() or join() waited for that lock, and both waited for ever.
  for (int variant = 0; variant < 2; ++variant) {
    CAPTURE(variant);
    procpool::Pool pool(test::options<TestType>());
    std::atomic<bool> done{false};
    auto r = pool.apply_async<sq>(3L, procpool::callbacks([&](const long&) {
                                    std::this_thread::sleep_for(200ms);  // the caller is in join() by now
                                    if (variant == 0) {
                                      pool.terminate();
                                    } else {
                                      pool.close();
                                      pool.join();
                                    }
                                    done = true;
                                  }));
    pool.close();
    pool.join();
    CHECK(done);
    CHECK(r.get() == 9);
  }
  // Nor does another thread's terminate() wait for a long callback join() waits for.
  procpool::Pool pool(test::options<TestType>());
  auto r = pool.apply_async<sq>(3L, procpool::callbacks([](const long&) { std::this_thread::sleep_for(5s); }));
  pool.close();
  std::thread joiner([&] { pool.join(); });
  std::this_thread::sleep_for(300ms);
  const auto start = std::chrono::steady_clock::now();
  pool.terminate();
  CHECK(std::chrono::steady_clock::now() - start < 3s);  // not the callback's 5 s
  joiner.join();
  CHECK(r.get() == 9);
}

POOL_TEST("a callback that waits for its own call gets an error, not a wait for ever", "[callbacks][reentrant]") {
  // Its call is complete once the callback returns: waiting for it there
  // hung, and so did the pool's destructor after it.
  procpool::Pool pool(test::options<TestType>());
  std::promise<std::string> said;
  procpool::AsyncResult<std::vector<long>> self;
  std::promise<void> ready;
  auto waiting = ready.get_future().share();
  self = pool.map_async<sq>(iota_vec(3), 0, [&, waiting](const std::vector<long>&) {
    waiting.wait();
    try {
      self.get();
      said.set_value("returned");
    } catch (const procpool::Error& e) {
      said.set_value(e.what());
    }
  });
  ready.set_value();
  CHECK_THAT(said.get_future().get(), Catch::Contains("own callback waited for it to finish"));
  CHECK(self.get() == squares(3));
}

POOL_TEST("a callback may wait with procpool::wait and as_completed for calls whose callbacks come after it",
          "[callbacks][reentrant][wait]") {
  // Those calls finish once their callbacks have run, on the thread the
  // waiting callback holds: procpool::wait and as_completed waited for ever.
  procpool::Pool pool(test::options<TestType>());
  std::promise<void> go;
  auto gate = go.get_future().share();
  std::vector<procpool::AsyncResult<long>> later;
  std::promise<std::string> seen;
  auto first = pool.apply_async<sq>(1L, procpool::callbacks([&, gate](const long&) {
                                      gate.wait();
                                      try {
                                        auto [done, not_done] = procpool::wait(later);
                                        long sum = 0;
                                        for (const auto& r : procpool::as_completed(later)) sum += r.get();
                                        seen.set_value(
                                            fmt::format("{} done, {} not, sum {}", done.size(), not_done.size(), sum));
                                      } catch (const std::exception& e) {
                                        seen.set_value(e.what());
                                      }
                                    }));
  std::atomic<int> ran{0};
  for (long x : {2L, 3L, 4L})
    later.push_back(pool.apply_async<sq>(x, procpool::callbacks([&](const long&) { ++ran; })));
  go.set_value();
  CHECK(seen.get_future().get() == "3 done, 0 not, sum 29");
  CHECK(first.get() == 1);
  CHECK(ran == 3);
}

POOL_TEST("a callback that waits with procpool::wait or as_completed for its own call gets an error",
          "[callbacks][reentrant][wait]") {
  procpool::Pool pool(test::options<TestType>());
  std::promise<void> go;
  auto gate = go.get_future().share();
  std::vector<procpool::AsyncResult<long>> both;
  std::promise<std::vector<std::string>> said;
  both.push_back(pool.apply_async<sq>(5L));
  both.push_back(pool.apply_async<sq>(6L, procpool::callbacks([&, gate](const long&) {
                                        gate.wait();
                                        std::vector<std::string> what;
                                        auto attempt = [&](auto&& wait) {
                                          try {
                                            wait();
                                            what.push_back("returned");
                                          } catch (const procpool::Error& e) {
                                            what.push_back(e.what());
                                          }
                                        };
                                        attempt([&] { procpool::wait(both); });
                                        attempt([&] { procpool::wait(both, procpool::ReturnWhen::first_exception); });
                                        attempt([&] {
                                          for (const auto& r : procpool::as_completed(both)) (void)r;
                                        });
                                        // It can end without its own call: it returns.
                                        attempt([&] { procpool::wait(both, procpool::ReturnWhen::first_completed); });
                                        attempt([&] { procpool::wait(both, 10ms); });
                                        said.set_value(what);
                                      })));
  go.set_value();
  const auto what = said.get_future().get();
  REQUIRE(what.size() == 5);
  for (std::size_t k = 0; k < 3; ++k) {
    INFO(k);
    CHECK_THAT(what[k], Catch::Contains("own callback waited for it to finish"));
  }
  CHECK(what[3] == "returned");
  CHECK(what[4] == "returned");
  CHECK(both[1].get() == 36);
}

POOL_TEST("a callback may wait for a call of another pool, and learns of its cancellation", "[callbacks][reentrant]") {
  // That call's news comes through the other pool's callback thread: the
  // waiting callback ran its own queue, and slept until work came there.
  procpool::Pool a(test::options<TestType>({.processes = 1}));
  procpool::Pool b(test::options<TestType>({.processes = 1}));
  // If it does not return, news for b's queue wakes it, so that the test
  // fails rather than hangs.
  auto unstick = [&] { (void)b.apply_async<sq>(0L, procpool::callbacks([](const long&) {})); };
  auto slow = a.apply_async<nap>(300L, procpool::callbacks([](const long&) {}));
  std::promise<long> got;
  (void)b.apply_async<sq>(2L, procpool::callbacks([&](const long&) { got.set_value(slow.get()); }));
  auto value = got.get_future();
  bool in_time = value.wait_for(30s) == std::future_status::ready;
  if (!in_time) unstick();
  CHECK(in_time);
  CHECK(value.get() == 300);

  // A call cancelled from another thread while a callback waits for it.
  auto busy = a.apply_async<nap>(1000L);  // a's one worker
  auto queued = a.apply_async<sq>(5L, procpool::callbacks([](const long&) {}));
  std::promise<void> waiting;
  std::promise<std::string> said;
  (void)b.apply_async<sq>(4L, procpool::callbacks([&](const long&) {
                            waiting.set_value();
                            try {
                              (void)queued.get();
                              said.set_value("returned");
                            } catch (const procpool::Error& e) {
                              said.set_value(e.what());
                            }
                          }));
  waiting.get_future().wait();
  std::this_thread::sleep_for(50ms);  // to be in get() by now (it passes either way)
  CHECK(queued.cancel());
  auto what = said.get_future();
  in_time = what.wait_for(30s) == std::future_status::ready;
  if (!in_time) unstick();
  CHECK(in_time);
  CHECK_THAT(what.get(), Catch::Contains("cancelled"));
  CHECK(busy.get() == 1000);
}

POOL_TEST("a progress callback may run a call with a progress callback of its own",
          "[callbacks][reentrant][progress]") {
  // The inner call runs the callback queue while it waits, and so the outer
  // call's next report, which waited for the running one: a deadlock.
  procpool::Pool pool(test::options<TestType>());
  std::atomic<bool> first{true};
  std::vector<std::size_t> outer;  // on the callback thread only, as inner
  std::vector<long> inner;
  auto all =
      pool.map_async<sq>(iota_vec(60), {.chunksize = 1, .progress = [&](std::size_t done, auto) {
                                          outer.push_back(done);
                                          if (!first.exchange(false)) return;
                                          inner = pool.map<sq>(iota_vec(30),
                                                               {.chunksize = 1, .progress = [](std::size_t, auto) {}});
                                        }});
  CHECK(all.get() == squares(60));
  // Reports held back come once the first returns, which may be after get():
  // join() waits for every callback.
  pool.close();
  pool.join();
  CHECK(inner == squares(30));
  CHECK(std::is_sorted(outer.begin(), outer.end()));
  REQUIRE_FALSE(outer.empty());
  CHECK(outer.back() == 60);
}

POOL_TEST("a progress callback that waits for its own call gets an error, not a wait for ever",
          "[callbacks][reentrant][progress]") {
  // The chunk it reports is taken in once it returns: get() there hung,
  // and so did the pool's destructor.
  procpool::Pool pool(test::options<TestType>());
  procpool::AsyncResult<std::vector<long>> self;  // by reference: no cycle through its own state
  std::promise<void> ready;
  auto gate = ready.get_future().share();
  std::promise<std::string> said;
  std::atomic<bool> first{true};
  self = pool.map_async<sq>(iota_vec(4), {.chunksize = 1, .progress = [&, gate](std::size_t, auto) {
                                            if (!first.exchange(false)) return;
                                            gate.wait();
                                            try {
                                              (void)self.get();
                                              said.set_value("returned");
                                            } catch (const procpool::Error& e) {
                                              said.set_value(e.what());
                                            }
                                          }});
  ready.set_value();
  CHECK_THAT(said.get_future().get(), Catch::Contains("own callback waited for it to finish"));
  CHECK(self.get() == squares(4));
}

POOL_TEST("on_worker_output may call back into its pool", "[callbacks][reentrant][output]") {
  // The first line's callback acts; the others return at once. (Not
  // std::call_once: after a callable that threw, libstdc++'s call_once can
  // wait for ever.)
  SECTION("apply") {
    std::atomic<bool> first{true};
    std::promise<long> inner;
    auto inner_value = inner.get_future();
    std::atomic<procpool::Pool*> self{nullptr};  // read on the output relay's thread
    procpool::Pool pool(test::options<TestType>({.on_worker_output = [&](const procpool::WorkerLine&) {
      if (!first.exchange(false)) return;
      try {
        inner.set_value(self.load()->apply<sq>(6L));
      } catch (...) {
        inner.set_exception(std::current_exception());
      }
    }}));
    self = &pool;
    CHECK(pool.map<print_and_return>(iota_vec(5), 1) == iota_vec(5));
    // The lines may reach the relay after map has returned: wait for the callback's call.
    REQUIRE(inner_value.wait_for(30s) == std::future_status::ready);
    CHECK(inner_value.get() == 36);
    pool.close();
    pool.join();
  }
  SECTION("terminate") {
    std::atomic<bool> first{true};
    std::atomic<procpool::Pool*> self{nullptr};
    std::promise<void> terminated;
    procpool::Pool pool(test::options<TestType>({.on_worker_output = [&](const procpool::WorkerLine&) {
      if (!first.exchange(false)) return;
      self.load()->terminate();
      terminated.set_value();
    }}));
    self = &pool;
    auto r = pool.map_async<print_and_return>(iota_vec(5), 1);
    REQUIRE(terminated.get_future().wait_for(30s) == std::future_status::ready);
    CHECK(r.wait(30s));
    CHECK_THROWS_AS(pool.apply<sq>(2L), procpool::PoolNotRunning);
  }
}

}  // namespace callbacks_test

// What a failing task looks like to the caller: exceptions thrown in a
// worker (RemoteError), workers that die (WorkerLost), waits that run out
// (TimeoutError), and the callbacks of map_async.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <future>
#include <numeric>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common.hpp"

// A named namespace, not an anonymous one: a worker finds a task's code by
// its type's name, and the other test files have helpers of the same names.
namespace errors_test {

using namespace std::chrono_literals;

using test::iota_vec;

long squared(long x) { return x * x; }

using test::squares;

/// Rejects 7; the message carries the worker's pid so the test can check RemoteError::pid().
long reject_seven(long x) {
  if (x == 7) throw std::invalid_argument("cannot take seven (pid " + std::to_string(::getpid()) + ")");
  return x * x;
}

/// Throws for every multiple of 5 (0 included).
long reject_fives(long x) {
  if (x % 5 == 0) throw std::domain_error("multiple of five: " + std::to_string(x));
  return x * x;
}

/// Leaves a file per item in `dir`, then fails items 3 and 11: item 11 at
/// once, item 3 only after a while, so the first failure by input index is
/// not the first one to happen. Items from 12 on are slow, so they are still
/// running when the failures arrive.
struct TouchAndFail {
  std::string dir;
  long operator()(long x) const {
    test::append_line(dir + "/" + std::to_string(x), "ran");
    if (x == 3) {
      std::this_thread::sleep_for(200ms);
      throw std::runtime_error("item 3 failed late");
    }
    if (x == 11) throw std::runtime_error("item 11 failed early");
    if (x >= 12) std::this_thread::sleep_for(20ms);
    return x;
  }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(dir);
  }
};

struct Oops {};

long throw_int(long x) {
  if (x == 1) throw 42;
  return x;
}

long throw_oops(long) { throw Oops{}; }

long throw_nested(long) {
  try {
    throw std::runtime_error("inner");
  } catch (...) {
    std::throw_with_nested(std::logic_error("outer"));
  }
  return 0;
}

// ---- dying workers ------------------------------------------------------------

enum Death : int { by_abort, by_sigkill, by_exit_7 };

[[noreturn]] void die(int how) {
  switch (how) {
    case by_abort:
      // A forked worker inherits the test runner's own SIGABRT handler
      // (Catch2 reports fatal signals, on the parent's stdout); a crashing
      // program normally meets the default action, so restore it.
      std::signal(SIGABRT, SIG_DFL);
      std::abort();
    case by_sigkill:
      ::raise(SIGKILL);
      break;
    default:
      std::_Exit(7);
  }
  std::_Exit(99);
}

/// Kills its worker on the item `victim`; every other item returns (x*x, pid).
struct DieOn {
  long victim = -1;
  int how = by_sigkill;
  std::pair<long, int> operator()(long x) const {
    if (x == victim) die(how);
    return {x * x, static_cast<int>(::getpid())};
  }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(victim, how);
  }
};

/// A slow task reporting its worker: enough of them keep every worker busy.
int pid_after(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return static_cast<int>(::getpid());
}

struct DeathCase {
  int how;
  int signal;
  int exit_code;
  std::string words;  // what WorkerLost::what() must say about it
};

const std::vector<DeathCase>& death_cases() {
  static const std::vector<DeathCase> cases{
      {by_abort, SIGABRT, -1, "SIGABRT"},
      {by_sigkill, SIGKILL, -1, "SIGKILL"},
      {by_exit_7, 0, 7, "exited with code 7"},
  };
  return cases;
}

void check_lost(const procpool::WorkerLost& e, const DeathCase& death, std::size_t index) {
  CAPTURE(e.what());
  CHECK(e.input_index() == index);
  CHECK(e.signal() == death.signal);
  CHECK(e.exit_code() == death.exit_code);
  CHECK(e.pid() > 0);
  CHECK(e.pid() != ::getpid());
  CHECK(e.worker() < 2);
  CHECK_THAT(e.what(), Catch::Contains(death.words));
  CHECK_THAT(e.what(), Catch::Contains(std::to_string(e.pid())));
}

// ---- slow and failing apply_async -------------------------------------------

long nap_then(long x, int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return x;
}

// ---- results that are not plain numbers ----------------------------------------

std::string spell(long x) {
  if (x == 4) throw std::out_of_range("no word for 4");
  return std::string(static_cast<std::size_t>(x), 'a') + "!";
}

/// A result whose serialization fails halfway for `poison` readings: the
/// worker has already written part of it when the exception flies.
struct Reading {
  std::string label;
  long value = 0;
  bool poison = false;
  template <class Archive>
  void save(Archive& ar) const {
    ar(label);
    if (poison) throw std::length_error("reading " + label + " cannot be saved");
    ar(value);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(label, value);
  }
};

Reading read_sensor(long x) { return {"sensor" + std::to_string(x), x * 10, x == 6}; }

/// Throws one of procpool's own errors, as a task calling another pool may.
long throws_protocol_error(long x) { throw procpool::ProtocolError("from inside the task " + std::to_string(x)); }

}  // namespace errors_test

namespace errors_test {

// ---- RemoteError ------------------------------------------------------------------

POOL_TEST("a task that throws surfaces as RemoteError naming type, message, input and worker", "[errors][remote]") {
  procpool::Pool pool(test::options<TestType>());
  auto e = test::thrown<procpool::RemoteError>([&] { pool.map<reject_seven>(iota_vec(20), 1); });
  CAPTURE(e.what());
  CHECK(e.type_name() == "std::invalid_argument");
  CHECK(e.message() == "cannot take seven (pid " + std::to_string(e.pid()) + ")");
  CHECK(e.input_index() == 7);
  CHECK(e.pid() > 0);
  CHECK(e.pid() != ::getpid());
  CHECK(e.worker() < 2);
  std::string what = e.what();
  CHECK_THAT(what, Catch::Contains("std::invalid_argument"));
  CHECK_THAT(what, Catch::Contains("cannot take seven"));
  CHECK_THAT(what, Catch::Contains("input #7"));
  CHECK_THAT(what, Catch::Contains(std::to_string(e.pid())));
  // one catch clause catches every procpool failure
  CHECK_THROWS_AS(pool.map<reject_seven>(iota_vec(8)), procpool::Error);

  // the pool goes on working
  CHECK(pool.map<squared>(iota_vec(100)) == squares(100));
  CHECK(pool.map<reject_seven>(iota_vec(7)) == squares(7));
}

POOL_TEST("map reports the first failing item by input index, after every item ran", "[errors][remote]") {
  test::TempDir dir;
  procpool::Pool pool(test::options<TestType>());
  auto e = test::thrown<procpool::RemoteError>([&] { pool.map(TouchAndFail{dir.path()}, iota_vec(30), 1); });
  CHECK(e.input_index() == 3);
  CHECK(e.message() == "item 3 failed late");
  CHECK(e.type_name() == "std::runtime_error");
  // no item was abandoned when the failures arrived: each left its file
  CHECK(dir.files().size() == 30);
  for (const auto& name : dir.files()) CHECK(test::read_lines(dir / name).size() == 1);

  // the same through map_async: the first failure by index, once all ran
  test::TempDir again;
  auto async = pool.map_async(TouchAndFail{again.path()}, iota_vec(30), 2);
  auto e2 = test::thrown<procpool::RemoteError>([&] { async.get(); });
  CHECK(e2.input_index() == 3);
  CHECK(again.files().size() == 30);
  CHECK(async.ready());
  CHECK_FALSE(async.successful());

  CHECK(pool.map<squared>(iota_vec(50), 3) == squares(50));
}

POOL_TEST("an exception of a non-std type is reported by its type name", "[errors][remote]") {
  procpool::Pool pool(test::options<TestType>());
  auto e = test::thrown<procpool::RemoteError>([&] { pool.map<throw_int>(iota_vec(4)); });
  CHECK(e.type_name() == "int");
  CHECK(e.input_index() == 1);
  CHECK_THAT(e.what(), Catch::Contains("input #1 raised int (worker"));  // no ": " before an empty message

  auto oops = test::thrown<procpool::RemoteError>([&] { pool.apply<throw_oops>(5L); });
  CHECK(oops.type_name() == "errors_test::Oops");
  CHECK(oops.input_index() == 0);
  CHECK_THAT(oops.what(), Catch::Contains("errors_test::Oops"));

  CHECK(pool.map<squared>(iota_vec(10)) == squares(10));
}

POOL_TEST("an exception thrown with std::throw_with_nested is reported by the type the task threw",
          "[errors][remote]") {
  // It read "std::_Nested_exception<std::logic_error>", which
  // raise_original_exceptions could not raise again.
  procpool::Pool pool(test::options<TestType>());
  auto e = test::thrown<procpool::RemoteError>([&] { pool.apply<throw_nested>(1L); });
  CHECK(e.type_name() == "std::logic_error");
  CHECK(e.message() == "outer");
  procpool::Pool original(test::options<TestType>({.raise_original_exceptions = true}));
  CHECK_THROWS_AS(original.apply<throw_nested>(1L), std::logic_error);
}

POOL_TEST("a task that throws procpool::ProtocolError itself gets a RemoteError, like any other type",
          "[errors][remote]") {
  // The wire says "the worker could not send the result" with a code of its
  // own, never by the exception's type name.
  procpool::Pool pool(test::options<TestType>());
  try {
    pool.apply<errors_test::throws_protocol_error>(4L);
    FAIL("no exception");
  } catch (const procpool::RemoteError& e) {
    CHECK(e.type_name() == "procpool::ProtocolError");
    CHECK(e.message() == "from inside the task 4");
  }
}

POOL_TEST("with chunksize > 1 only the failing item of a chunk fails", "[errors][remote][chunks]") {
  procpool::Pool pool(test::options<TestType>());
  // chunks of 4: [4, 5, 6, 7] holds the one failure, 5
  std::vector<long> in{1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13};
  auto rejects_5 = [](long x) {
    if (x == 5) throw std::invalid_argument("five");
    return x * 10;
  };
  auto results = pool.imap(rejects_5, in, 4);
  std::size_t i = 0;
  for (auto it = results.begin(); it != results.end(); ++it, ++i) {
    CAPTURE(i);
    if (in[i] == 5) {
      auto e = test::thrown<procpool::RemoteError>([&] { (void)*it; });
      CHECK(e.input_index() == i);
      CHECK(e.message() == "five");
    } else {
      CHECK(*it == in[i] * 10);
    }
  }
  CHECK(i == in.size());

  // map over the same: the one failure, by its index
  auto e = test::thrown<procpool::RemoteError>([&] { pool.map(rejects_5, in, 4); });
  CHECK(e.input_index() == 4);

  // several failures spread over chunks of 7
  auto unordered = pool.imap_unordered<reject_fives>(iota_vec(40), 7);
  std::vector<long> values;
  std::vector<std::size_t> failed;
  for (auto it = unordered.begin(); it != unordered.end(); ++it) {
    try {
      values.push_back(*it);
    } catch (const procpool::RemoteError& err) {
      failed.push_back(err.input_index());
      CHECK(err.message() == "multiple of five: " + std::to_string(err.input_index()));
    }
  }
  std::sort(values.begin(), values.end());
  std::sort(failed.begin(), failed.end());
  std::vector<long> expected;
  for (long x = 0; x < 40; ++x)
    if (x % 5 != 0) expected.push_back(x * x);
  CHECK(values == expected);
  CHECK(failed == std::vector<std::size_t>{0, 5, 10, 15, 20, 25, 30, 35});
}

POOL_TEST("imap raises a failed item where it is reached and goes on past it", "[errors][remote][imap]") {
  procpool::Pool pool(test::options<TestType>());
  auto in = iota_vec(20);

  // range-for style: dereference, then ++it
  auto results = pool.imap<reject_fives>(in, 1);
  std::size_t i = 0;
  std::vector<std::size_t> failed;
  for (auto it = results.begin(); it != results.end(); ++it, ++i) {
    CAPTURE(i);
    if (i % 5 == 0) {
      auto e = test::thrown<procpool::RemoteError>([&] { (void)*it; });
      CHECK(e.input_index() == i);
      failed.push_back(i);
    } else {
      CHECK(*it == static_cast<long>(i * i));
    }
  }
  CHECK(i == 20);
  CHECK(failed == std::vector<std::size_t>{0, 5, 10, 15});

  // ++it without looking at the failed item skips it
  auto skipped = pool.imap<reject_seven>(iota_vec(10), 3);
  std::vector<long> seen;
  std::size_t n = 0;
  for (auto it = skipped.begin(); it != skipped.end(); ++it, ++n) {
    if (n != 7) seen.push_back(*it);
  }
  CHECK(n == 10);
  CHECK(seen == std::vector<long>{0, 1, 4, 9, 16, 25, 36, 64, 81});

  // next(): throws at the failure, the following call returns the next item
  auto stepped = pool.imap<reject_seven>(iota_vec(10), 2);
  for (long x = 0; x < 7; ++x) CHECK(stepped.next() == x * x);
  auto e = test::thrown<procpool::RemoteError>([&] { stepped.next(); });
  CHECK(e.input_index() == 7);
  CHECK(stepped.next() == 64);
  CHECK(stepped.next() == 81);
  CHECK_FALSE(stepped.next().has_value());

  // and imap_unordered yields everything else, plus exactly one error
  auto unordered = pool.imap_unordered<reject_seven>(iota_vec(30), 1);
  std::vector<long> values;
  int errors = 0;
  for (auto it = unordered.begin(); it != unordered.end(); ++it) {
    try {
      values.push_back(*it);
    } catch (const procpool::RemoteError& err) {
      ++errors;
      CHECK(err.input_index() == 7);
    }
  }
  CHECK(errors == 1);
  std::sort(values.begin(), values.end());
  auto expected = squares(30);
  expected.erase(expected.begin() + 7);
  CHECK(values == expected);

  CHECK(pool.map<squared>(iota_vec(100)) == squares(100));
}

// ---- WorkerLost --------------------------------------------------------------------

POOL_TEST("a worker that dies fails only the item it held and is replaced", "[errors][crash]") {
  // One task per worker at a time, so a dead worker held exactly one item.
  procpool::Pool pool(test::options<TestType>({.processes = 2, .max_tasks_in_flight = 1}));
  std::set<int> pids;  // every worker seen so far
  for (int ms : pool.map<pid_after>(std::vector<int>(8, 20), 1)) pids.insert(ms);

  for (const auto& death : death_cases()) {
    CAPTURE(death.words);

    // imap: the lost item throws where it is reached, every other one arrives
    auto results = pool.imap(DieOn{4, death.how}, iota_vec(12), 1);
    std::size_t i = 0;
    int dead = 0;
    for (auto it = results.begin(); it != results.end(); ++it, ++i) {
      CAPTURE(i);
      if (i == 4) {
        auto e = test::thrown<procpool::WorkerLost>([&] { (void)*it; });
        check_lost(e, death, 4);
        CHECK_THAT(e.what(), Catch::Contains("imap input #4"));
        dead = e.pid();
      } else {
        CHECK(it->first == static_cast<long>(i * i));
        CHECK(it->second != dead);
        pids.insert(it->second);
      }
    }
    CHECK(i == 12);

    // map: the lost item is the error, once the others have run
    auto e = test::thrown<procpool::WorkerLost>([&] { pool.map(DieOn{6, death.how}, iota_vec(12), 1); });
    check_lost(e, death, 6);
    CHECK_THAT(e.what(), Catch::Contains("map input #6"));

    // the dead workers were replaced: both slots run tasks, under new pids
    std::set<int> before = pids;
    std::set<int> now;
    for (int pid : pool.map<pid_after>(std::vector<int>(8, 20), 1)) now.insert(pid);
    CHECK(now.size() == 2);
    CHECK(now.count(dead) == 0);
    CHECK(now.count(e.pid()) == 0);
    pids.insert(now.begin(), now.end());
    CHECK(pids.size() > before.size());
  }
  CHECK(pool.map<squared>(iota_vec(1000)) == squares(1000));
}

POOL_TEST("apply_async on a task that kills its worker raises WorkerLost", "[errors][crash][apply]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2, .max_tasks_in_flight = 1}));
  for (const auto& death : death_cases()) {
    CAPTURE(death.words);
    auto doomed = pool.apply_async(DieOn{1, death.how}, 1L);
    auto fine = pool.apply_async(DieOn{1, death.how}, 2L);
    auto e = test::thrown<procpool::WorkerLost>([&] { doomed.get(); });
    check_lost(e, death, 0);
    CHECK_THAT(e.what(), Catch::Contains("apply_async"));
    CHECK(doomed.ready());
    CHECK_FALSE(doomed.successful());
    CHECK(fine.get().first == 4);
    CHECK(fine.successful());
    // the replacement takes new work
    CHECK(pool.apply(DieOn{-1, death.how}, 3L).first == 9);
    auto again = pool.apply_async(DieOn{1, death.how}, 1L);
    auto e2 = test::thrown<procpool::WorkerLost>([&] { again.get(); });
    CHECK(e2.pid() != e.pid());
  }
  CHECK(pool.map<squared>(iota_vec(100)) == squares(100));
}

POOL_TEST("a lost chunk fails each of its items with its own index", "[errors][crash][chunks]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2, .max_tasks_in_flight = 1}));
  // chunks of 3: [3, 4, 5] is lost with its worker
  auto results = pool.imap(DieOn{4, by_sigkill}, iota_vec(9), 3);
  std::size_t i = 0;
  for (auto it = results.begin(); it != results.end(); ++it, ++i) {
    CAPTURE(i);
    if (i >= 3 && i <= 5) {
      auto e = test::thrown<procpool::WorkerLost>([&] { (void)*it; });
      CHECK(e.input_index() == i);
      CHECK(e.signal() == SIGKILL);
      CHECK_THAT(e.what(), Catch::Contains("input #" + std::to_string(i)));
    } else {
      CHECK(it->first == static_cast<long>(i * i));
    }
  }
  CHECK(i == 9);

  auto unordered = pool.imap_unordered(DieOn{4, by_exit_7}, iota_vec(9), 3);
  std::vector<std::size_t> lost;
  std::vector<long> values;
  for (auto it = unordered.begin(); it != unordered.end(); ++it) {
    try {
      values.push_back(it->first);
    } catch (const procpool::WorkerLost& e) {
      CHECK(e.exit_code() == 7);
      lost.push_back(e.input_index());
    }
  }
  std::sort(lost.begin(), lost.end());
  std::sort(values.begin(), values.end());
  CHECK(lost == std::vector<std::size_t>{3, 4, 5});
  CHECK(values == std::vector<long>{0, 1, 4, 36, 49, 64});
  CHECK(pool.map<squared>(iota_vec(100), 3) == squares(100));
}

// ---- AsyncResult ---------------------------------------------------------------------

POOL_TEST("apply_async's get and wait time out while the task runs, then succeed", "[errors][apply][timeout]") {
  procpool::Pool pool(test::options<TestType>());
  auto slow = pool.apply_async<nap_then>(5L, 2000);
  CHECK_THROWS_AS(slow.get(50ms), procpool::TimeoutError);
  CHECK_THROWS_WITH(slow.get(std::chrono::milliseconds(10)),
                    Catch::Contains("apply_async") && Catch::Contains("within 10 ms"));
  CHECK_THROWS_WITH(slow.get(-5s), Catch::Contains("a timeout of 0 or less does not wait"));
  CHECK_FALSE(slow.ready());
  CHECK_FALSE(slow.wait(50ms));
  CHECK_THROWS_AS(slow.successful(), procpool::Error);
  // the task went on running: a plain get() returns its value
  CHECK(slow.get() == 5);
  CHECK(slow.ready());
  CHECK(slow.wait(50ms));
  CHECK(slow.successful());
  CHECK(slow.get(1ms) == 5);
}

POOL_TEST("apply_async on a task that throws: not successful, get() rethrows", "[errors][apply][remote]") {
  procpool::Pool pool(test::options<TestType>());
  auto bad = pool.apply_async<reject_seven>(7L);
  bad.wait();
  CHECK(bad.ready());
  CHECK_FALSE(bad.successful());
  auto e = test::thrown<procpool::RemoteError>([&] { bad.get(); });
  CHECK(e.type_name() == "std::invalid_argument");
  CHECK(e.input_index() == 0);
  CHECK_THAT(e.what(), Catch::Contains("apply_async"));
  // every get() rethrows it
  CHECK_THROWS_AS(bad.get(), procpool::RemoteError);
  CHECK_THROWS_AS(bad.get(1s), procpool::RemoteError);
  // apply() throws it directly
  CHECK_THROWS_AS(pool.apply<reject_seven>(7L), procpool::RemoteError);
  CHECK(pool.apply<reject_seven>(6L) == 36);
}

// ---- map_async callbacks ----------------------------------------------------------

POOL_TEST("map_async's callback receives the results", "[errors][callbacks]") {
  std::promise<std::vector<long>> delivered;
  std::atomic<int> errors{0};
  procpool::Pool pool(test::options<TestType>());
  auto in = iota_vec(500);
  auto async = pool.map_async<squared>(
      in, 7, [&delivered](const std::vector<long>& values) { delivered.set_value(values); },
      [&errors](const procpool::Error&) { ++errors; });
  auto future = delivered.get_future();
  REQUIRE(future.wait_for(30s) == std::future_status::ready);
  CHECK(future.get() == squares(500));
  CHECK(async.get() == squares(500));
  CHECK(errors == 0);
}

POOL_TEST("map_async's error_callback receives the error naming the failed input", "[errors][callbacks]") {
  std::promise<std::string> reported;
  std::atomic<int> successes{0};
  procpool::Pool pool(test::options<TestType>());
  auto async = pool.map_async<reject_seven>(
      iota_vec(20), 3, [&successes](const std::vector<long>&) { ++successes; },
      [&reported](const procpool::Error& e) {
        auto* remote = dynamic_cast<const procpool::RemoteError*>(&e);
        reported.set_value(remote != nullptr ? e.what() : std::string("not a RemoteError: ") + e.what());
      });
  auto future = reported.get_future();
  REQUIRE(future.wait_for(30s) == std::future_status::ready);
  std::string what = future.get();
  CHECK_THAT(what, Catch::Contains("map_async input #7"));
  CHECK_THAT(what, Catch::Contains("std::invalid_argument"));
  CHECK_THROWS_AS(async.get(), procpool::RemoteError);
  CHECK(successes == 0);

  // a lost worker reaches the error_callback too
  std::promise<int> lost_signal;
  auto crash = pool.map_async(DieOn{2, by_sigkill}, iota_vec(5), 1, nullptr, [&lost_signal](const procpool::Error& e) {
    auto* lost = dynamic_cast<const procpool::WorkerLost*>(&e);
    lost_signal.set_value(lost != nullptr ? lost->signal() : -1);
  });
  auto lost_future = lost_signal.get_future();
  REQUIRE(lost_future.wait_for(30s) == std::future_status::ready);
  CHECK(lost_future.get() == SIGKILL);
  CHECK_THROWS_AS(crash.get(), procpool::WorkerLost);
}

POOL_TEST("a callback that throws does not break the pool", "[errors][callbacks]") {
  std::promise<std::size_t> called;
  std::promise<std::size_t> error_called;
  procpool::Pool pool(test::options<TestType>());
  auto first = pool.map_async<squared>(iota_vec(50), 0, [&called](const std::vector<long>& values) {
    called.set_value(values.size());
    throw std::runtime_error("a buggy callback");
  });
  auto future = called.get_future();
  REQUIRE(future.wait_for(30s) == std::future_status::ready);
  CHECK(future.get() == 50);
  CHECK(first.get() == squares(50));

  auto second = pool.map_async<reject_seven>(iota_vec(10), 1, nullptr, [&error_called](const procpool::Error& e) {
    error_called.set_value(dynamic_cast<const procpool::RemoteError&>(e).input_index());
    throw 17;
  });
  auto error_future = error_called.get_future();
  REQUIRE(error_future.wait_for(30s) == std::future_status::ready);
  CHECK(error_future.get() == 7);
  CHECK_THROWS_AS(second.get(), procpool::RemoteError);

  // the I/O thread survived both: the pool still runs work and callbacks
  CHECK(pool.map<squared>(iota_vec(300), 5) == squares(300));
  std::promise<long> last;
  pool.map_async<squared>(std::vector<long>{12}, 0, [&last](const std::vector<long>& v) { last.set_value(v.at(0)); });
  auto last_future = last.get_future();
  REQUIRE(last_future.wait_for(30s) == std::future_status::ready);
  CHECK(last_future.get() == 144);
}

// ---- failures amid results of other types -----------------------------------------

POOL_TEST("strings and structs around a failure midway through a chunk still arrive", "[errors][remote][types]") {
  procpool::Pool pool(test::options<TestType>());
  // one chunk of 10 whose item 4 throws
  auto words = pool.imap<spell>(iota_vec(10), 10);
  std::size_t i = 0;
  for (auto it = words.begin(); it != words.end(); ++it, ++i) {
    CAPTURE(i);
    if (i == 4) {
      auto e = test::thrown<procpool::RemoteError>([&] { (void)*it; });
      CHECK(e.type_name() == "std::out_of_range");
      CHECK(e.message() == "no word for 4");
    } else {
      CHECK(*it == std::string(i, 'a') + "!");
    }
  }
  CHECK(i == 10);
  auto e = test::thrown<procpool::RemoteError>([&] { pool.map<spell>(iota_vec(10), 10); });
  CHECK(e.input_index() == 4);

  // one chunk of 10 whose item 6 fails while its result is being written
  auto readings = pool.imap<read_sensor>(iota_vec(10), 10);
  i = 0;
  for (auto it = readings.begin(); it != readings.end(); ++it, ++i) {
    CAPTURE(i);
    if (i == 6) {
      auto err = test::thrown<procpool::RemoteError>([&] { (void)*it; });
      CHECK(err.type_name() == "std::length_error");
      CHECK(err.message() == "reading sensor6 cannot be saved");
      CHECK(err.input_index() == 6);
    } else {
      CHECK(it->label == "sensor" + std::to_string(i));
      CHECK(it->value == static_cast<long>(i) * 10);
    }
  }
  CHECK(i == 10);
  auto async = pool.map_async<read_sensor>(iota_vec(10), 10);
  auto err = test::thrown<procpool::RemoteError>([&] { async.get(); });
  CHECK(err.input_index() == 6);

  std::vector<long> safe{0, 1, 2, 3, 5, 7, 8};
  auto ok = pool.map<read_sensor>(safe, 10);
  REQUIRE(ok.size() == safe.size());
  for (std::size_t k = 0; k < safe.size(); ++k) CHECK(ok[k].value == safe[k] * 10);
}

}  // namespace errors_test

TEST_CASE("reports of a throwing callback read right for every call and exception", "[errors]") {
  using procpool::detail::with_article;
  CHECK(with_article("map") == "a map");
  CHECK(with_article("apply_async") == "an apply_async");
  CHECK(with_article("imap_unordered") == "an imap_unordered");
  try {
    throw 42;
  } catch (...) {
    CHECK(procpool::detail::current_exception_summary() == "int");
  }
  try {
    throw std::runtime_error("bar broke");
  } catch (...) {
    CHECK(procpool::detail::current_exception_summary() == "std::runtime_error: bar broke");
  }
}

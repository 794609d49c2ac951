// A pool's life: recycling workers (maxtasksperchild), initializers,
// close/join, terminate, destruction with work in flight, and use from
// several threads.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <future>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "common.hpp"

// A named namespace, not an anonymous one: a worker finds a task's code by
// its type's name, and the other test files have helpers of the same names.
namespace lifecycle_test {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

using test::iota_vec;

long squared(long x) { return x * x; }

long slow_squared(long x) {
  std::this_thread::sleep_for(std::chrono::microseconds(200));
  return x * x;
}

std::vector<long> squares_of(const std::vector<long>& in) {
  std::vector<long> out;
  for (long x : in) out.push_back(x * x);
  return out;
}

std::pair<long, int> square_and_pid(long x) { return {x * x, static_cast<int>(::getpid())}; }

/// A slow task that reports its worker.
int pid_after(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return static_cast<int>(::getpid());
}

long nap(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return ms;
}

using test::running;

bool is_child(int pid) {
  auto children = test::child_pids();
  return std::find(children.begin(), children.end(), pid) != children.end();
}

std::vector<int> sorted_children() {
  auto children = test::child_pids();
  std::sort(children.begin(), children.end());
  return children;
}

/// A FIFO on which tasks announce (by writing their pid) that they have
/// started: the test waits on it instead of sleeping. It keeps a write end
/// of its own open so the read end never sees EOF between announcements.
class Announcements {
 public:
  explicit Announcements(std::string path) : path_(std::move(path)) {
    if (::mkfifo(path_.c_str(), 0600) != 0) throw std::runtime_error("mkfifo " + path_);
    read_ = ::open(path_.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    write_ = ::open(path_.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (read_ < 0 || write_ < 0) throw std::runtime_error("open " + path_);
  }
  Announcements(const Announcements&) = delete;
  Announcements& operator=(const Announcements&) = delete;
  ~Announcements() {
    ::close(read_);
    ::close(write_);
  }

  const std::string& path() const { return path_; }

  /// The pid of the next task to announce itself, or 0 if none did within `timeout`.
  int next(std::chrono::milliseconds timeout = 30s) {
    auto deadline = Clock::now() + timeout;
    int pid = 0;
    std::size_t got = 0;
    while (got < sizeof(pid)) {
      ssize_t n = ::read(read_, reinterpret_cast<char*>(&pid) + got, sizeof(pid) - got);
      if (n > 0) {
        got += static_cast<std::size_t>(n);
        continue;
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return 0;
      pollfd p{read_, POLLIN, 0};
      ::poll(&p, 1, static_cast<int>(left));
    }
    return pid;
  }

 private:
  std::string path_;
  int read_ = -1;
  int write_ = -1;
};

/// Announces itself on the FIFO, then sleeps: a task that is surely running
/// when the test goes on, and is still running long after.
int announce_then_sleep(std::string fifo, int seconds) {
  int pid = static_cast<int>(::getpid());
  int fd = ::open(fifo.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd >= 0) {
    [[maybe_unused]] auto n = ::write(fd, &pid, sizeof(pid));
    ::close(fd);
  }
  std::this_thread::sleep_for(std::chrono::seconds(seconds));
  return pid;
}

/// Kills its own worker: the pool forks a replacement at once.
void die_now(long) { ::raise(SIGKILL); }

// Where the program's own SIGTERM handler leaves its mark, should it ever run
// in a worker; a fixed buffer, as a signal handler may not allocate.
char g_sigterm_marker[512] = {};

extern "C" void program_sigterm_handler(int) {
  int fd = ::open(g_sigterm_marker, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd >= 0) {
    [[maybe_unused]] auto n = ::write(fd, "x", 1);
    ::close(fd);
  }
  ::_exit(1);
}

// ---- initializers ---------------------------------------------------------------

// Set in the worker by the initializers; the parent's copies stay 0.
int g_init_runs = 0;
int g_init_pid = 0;
long g_init_tag = 0;

/// Records that it ran, in the worker's globals and in a file per worker in `dir`.
void record_init(std::string dir, long tag) {
  ++g_init_runs;
  g_init_pid = static_cast<int>(::getpid());
  g_init_tag = tag;
  test::append_line(dir + "/" + std::to_string(::getpid()), "init");
}

struct InitSeen {
  int runs = 0;      // how often the initializer ran in this worker
  int init_pid = 0;  // the process it ran in
  long tag = 0;      // the argument it was given
  int pid = 0;       // the process running the task
  template <class Archive>
  void serialize(Archive& ar) {
    ar(runs, init_pid, tag, pid);
  }
};

InitSeen probe_init(long) {
  std::this_thread::sleep_for(5ms);  // slow enough that every worker gets some
  return {g_init_runs, g_init_pid, g_init_tag, static_cast<int>(::getpid())};
}

/// Leaves its trace, then fails.
void failing_init(std::string dir) {
  test::append_line(dir + "/" + std::to_string(::getpid()), "init");
  throw std::runtime_error("the model file is missing");
}

/// Every result came from a worker whose initializer ran exactly once, in
/// that worker, before the task. (Each trace file holds one line once the
/// pool is joined: until then a new worker may be writing its own.)
void check_initialized(const std::vector<InitSeen>& seen, const test::TempDir& dir, long tag) {
  for (const auto& s : seen) {
    CHECK(s.runs == 1);
    CHECK(s.init_pid == s.pid);
    CHECK(s.tag == tag);
    auto lines = test::read_lines(dir / std::to_string(s.pid));
    CHECK(lines == std::vector<std::string>{"init"});
  }
}

}  // namespace lifecycle_test

namespace lifecycle_test {

// ---- maxtasksperchild ----------------------------------------------------------

POOL_TEST("maxtasksperchild replaces workers after that many tasks", "[lifecycle][maxtasksperchild]") {
  const auto in = iota_vec(24);
  for (std::size_t max_tasks : {std::size_t{1}, std::size_t{3}}) {
    CAPTURE(max_tasks);
    procpool::Pool pool(test::options<TestType>({.processes = 2, .maxtasksperchild = max_tasks}));
    auto results = pool.map<square_and_pid>(in, 1);
    REQUIRE(results.size() == in.size());
    std::map<int, std::size_t> tasks_per_pid;
    for (std::size_t i = 0; i < in.size(); ++i) {
      CHECK(results[i].first == in[i] * in[i]);
      ++tasks_per_pid[results[i].second];
    }
    CHECK(tasks_per_pid.size() >= (in.size() + max_tasks - 1) / max_tasks);
    for (auto [pid, tasks] : tasks_per_pid) CHECK(tasks <= max_tasks);
    // and the pool goes on after the last recycling
    CHECK(pool.map<squared>(in, 2) == squares_of(in));
  }

  procpool::Pool forever(test::options<TestType>({.processes = 2, .maxtasksperchild = 0}));
  std::set<int> pids;
  for (auto [square, pid] : forever.map<square_and_pid>(iota_vec(200), 1)) pids.insert(pid);
  for (auto [square, pid] : forever.map<square_and_pid>(iota_vec(200), 1)) pids.insert(pid);
  CHECK(pids.size() <= 2);
}

/// When this task ran: [start, end) in ns of CLOCK_MONOTONIC, the same clock in every process.
std::pair<long, long> busy_for(long ms) {
  auto now = [] { return std::chrono::steady_clock::now().time_since_epoch() / 1ns; };
  const long start = static_cast<long>(now());
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return {start, static_cast<long>(now())};
}

POOL_TEST("with maxtasksperchild no more than processes tasks run at once", "[lifecycle][maxtasksperchild]") {
  for (std::size_t processes : {std::size_t{1}, std::size_t{2}}) {
    CAPTURE(processes);
    procpool::Pool pool(test::options<TestType>({.processes = processes, .maxtasksperchild = 1}));
    const auto spans = pool.map<busy_for>(std::vector<long>(12, 40L), 1);
    // The most tasks running at any one moment: at each start, those begun and not yet ended.
    std::size_t most = 0;
    for (const auto& [start, end] : spans) {
      std::size_t running = 0;
      for (const auto& [s, e] : spans) running += s <= start && start < e ? 1 : 0;
      most = std::max(most, running);
    }
    CHECK(most <= processes);
  }
}

// ---- initializer ------------------------------------------------------------------

POOL_TEST("an initializer runs once in each worker before its first task", "[lifecycle][initializer]") {
  test::TempDir dir;
  procpool::Pool pool(
      test::options<TestType>({.processes = 2, .initializer = procpool::initializer<record_init>(dir.path(), 42L)}));
  auto seen = pool.map<probe_init>(iota_vec(40), 1);
  REQUIRE(seen.size() == 40);
  check_initialized(seen, dir, 42);
  seen = pool.map<probe_init>(iota_vec(40), 3);  // no second run in the same workers
  check_initialized(seen, dir, 42);
  pool.close();
  pool.join();
  // once in each of the two workers, none of them replaced
  CHECK(dir.files().size() == 2);
  for (const auto& name : dir.files()) CHECK(test::read_lines(dir / name).size() == 1);
}

void hang_in_initializer() { std::this_thread::sleep_for(30s); }

POOL_TEST("task_timeout bounds a hung initializer: its calls fail, none waits for ever",
          "[lifecycle][initializer][timeout]") {
  procpool::Pool pool(test::options<TestType>(
      {.processes = 2, .initializer = procpool::initializer<hang_in_initializer>(), .task_timeout = 300ms}));
  const auto t0 = std::chrono::steady_clock::now();
  auto e = test::thrown<procpool::InitializerError>([&] { pool.map<squared>(iota_vec(4), 1); });
  INFO(e.what());
  CHECK_THAT(e.what(), Catch::Contains("longer than the task timeout (300 ms)"));
  CHECK(std::chrono::steady_clock::now() - t0 < 10s);
  // Not started again: later calls fail at once the same way.
  CHECK_THROWS_AS(pool.apply<squared>(2L), procpool::InitializerError);
}

POOL_TEST("a captureless lambda can be the initializer", "[lifecycle][initializer]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2, .initializer = [] {
                                                 ++lifecycle_test::g_init_runs;
                                                 lifecycle_test::g_init_pid = static_cast<int>(::getpid());
                                                 lifecycle_test::g_init_tag = 7;
                                               }}));
  for (const auto& s : pool.map<probe_init>(iota_vec(30), 1)) {
    CHECK(s.runs == 1);
    CHECK(s.init_pid == s.pid);
    CHECK(s.tag == 7);
  }
  CHECK(g_init_runs == 0);  // it ran in the workers, not here
}

POOL_TEST("with maxtasksperchild the initializer runs again in each new worker",
          "[lifecycle][initializer][maxtasksperchild]") {
  test::TempDir dir;
  procpool::Pool pool(test::options<TestType>(
      {.processes = 2, .maxtasksperchild = 2, .initializer = procpool::initializer<record_init>(dir.path(), 5L)}));
  auto seen = pool.map<probe_init>(iota_vec(20), 1);
  REQUIRE(seen.size() == 20);
  check_initialized(seen, dir, 5);
  std::set<int> pids;
  for (const auto& s : seen) pids.insert(s.pid);
  CHECK(pids.size() >= 10);
  pool.close();
  pool.join();
  // one trace per worker ever started, each with a single run
  CHECK(dir.files().size() >= pids.size());
  for (const auto& name : dir.files()) CHECK(test::read_lines(dir / name).size() == 1);
}

POOL_TEST("an initializer that throws fails the calls with InitializerError and is not retried",
          "[lifecycle][initializer]") {
  test::TempDir dir;
  const std::size_t processes = 2;
  procpool::Pool pool(test::options<TestType>(
      {.processes = processes, .initializer = procpool::initializer<failing_init>(dir.path())}));
  auto started = Clock::now();
  auto e = test::thrown<procpool::InitializerError>([&] { pool.map<squared>(iota_vec(20), 1); });
  CHECK_THAT(e.what(), Catch::Contains("the model file is missing"));
  CHECK_THAT(e.what(), Catch::Contains("std::runtime_error"));

  // later calls fail the same way instead of waiting for a worker
  auto later = pool.apply_async<squared>(3L);
  CHECK_THROWS_AS(later.get(), procpool::InitializerError);
  CHECK_THROWS_AS(pool.map<squared>(iota_vec(5)), procpool::InitializerError);
  auto lazy = pool.imap<squared>(iota_vec(5));
  CHECK_THROWS_AS(lazy.next(), procpool::InitializerError);
  CHECK(Clock::now() - started < 30s);  // a hang fails here, not at the ctest timeout

  // the pool did not keep starting workers to run it again
  auto runs = dir.files().size();
  CHECK(runs >= 1);
  CHECK(runs <= processes + 2);

  // the lambda form fails the same way
  procpool::Pool lambda_pool(
      test::options<TestType>({.processes = 2, .initializer = [] { throw std::invalid_argument("bad seed"); }}));
  auto e2 = test::thrown<procpool::InitializerError>([&] { lambda_pool.apply<squared>(2L); });
  CHECK_THAT(e2.what(), Catch::Contains("bad seed"));
  CHECK_THROWS_AS(lambda_pool.map<squared>(iota_vec(5)), procpool::InitializerError);

  // one that throws what is not a std::exception is named by its type
  procpool::Pool int_pool(test::options<TestType>({.processes = 1, .initializer = [] { throw 42; }}));
  auto e3 = test::thrown<procpool::InitializerError>([&] { int_pool.apply<squared>(2L); });
  CHECK_THAT(e3.what(), Catch::Contains(": int. The pool does not restart"));
}

// ---- close / join -------------------------------------------------------------------

POOL_TEST("close() refuses new work; join() waits for queued work and the workers' exit", "[lifecycle][close]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  CHECK_THROWS_AS(pool.join(), procpool::PoolNotRunning);  // still open

  int warm = pool.apply<pid_after>(0);
  CHECK(running(warm));  // a live worker, so the checks below are not vacuous

  std::vector<procpool::AsyncResult<int>> queued;
  for (int i = 0; i < 8; ++i) queued.push_back(pool.apply_async<pid_after>(100));
  pool.close();
  CHECK_THROWS_AS(pool.map<squared>(iota_vec(3)), procpool::PoolNotRunning);
  CHECK_THROWS_AS(pool.apply_async<squared>(3L), procpool::PoolNotRunning);
  CHECK_THROWS_AS(pool.imap<squared>(iota_vec(3)).next(), procpool::PoolNotRunning);
  pool.join();

  std::set<int> workers{warm};
  for (auto& r : queued) {
    CHECK(r.ready());  // join() waited for it
    CHECK(r.successful());
    workers.insert(r.get());
  }
  for (int pid : workers) {
    CAPTURE(pid);
    CHECK_FALSE(is_child(pid));
    CHECK_FALSE(running(pid));
  }
  CHECK_THROWS_AS(pool.apply<squared>(1L), procpool::PoolNotRunning);
}

// ---- terminate ------------------------------------------------------------------------

POOL_TEST("terminate() fails outstanding work at once and stops the workers", "[lifecycle][terminate]") {
  test::TempDir dir;
  Announcements started(dir / "started");
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  auto sleeper = pool.apply_async<announce_then_sleep>(started.path(), 30);
  auto queued = pool.apply_async<squared>(4L);  // behind it, on the only worker
  int worker = started.next();
  REQUIRE(worker > 0);
  CHECK(running(worker));

  auto t0 = Clock::now();
  pool.terminate();
  auto e = test::thrown<procpool::PoolNotRunning>([&] { sleeper.get(); });
  CHECK_THAT(e.what(), Catch::Contains("terminated"));
  CHECK_THROWS_AS(queued.get(), procpool::PoolNotRunning);
  CHECK(Clock::now() - t0 < 10s);  // not the task's 30 s
  CHECK_FALSE(sleeper.successful());

  CHECK_FALSE(is_child(worker));
  CHECK_FALSE(running(worker));  // killed
  CHECK_THROWS_AS(pool.map<squared>(iota_vec(3)), procpool::PoolNotRunning);
  pool.join();       // allowed after terminate(), returns at once
  pool.terminate();  // and a second terminate() is harmless
}

POOL_TEST("stopping workers never runs the program's own SIGTERM handler in them", "[lifecycle][terminate]") {
  // A forked worker inherits the program's signal handlers; the SIGTERM that
  // terminate() sends must still just end it, even when it reaches a worker
  // that was forked a moment before (here: the replacement of a dead one).
  test::TempDir dir;
  const std::string marker = dir / "handler-ran";
  REQUIRE(marker.size() < sizeof(g_sigterm_marker));
  std::strcpy(g_sigterm_marker, marker.c_str());
  struct HandlerInstalled {  // the test runner's own handler comes back whatever happens
    struct sigaction previous {};
    HandlerInstalled() {
      struct sigaction ours {};
      ours.sa_handler = program_sigterm_handler;
      sigemptyset(&ours.sa_mask);
      ::sigaction(SIGTERM, &ours, &previous);
    }
    ~HandlerInstalled() { ::sigaction(SIGTERM, &previous, nullptr); }
  };
  const auto children_before = sorted_children();
  {
    HandlerInstalled installed;
    for (int i = 0; i < 60; ++i) {
      procpool::Pool pool(test::options<TestType>({.processes = 2}));
      CHECK_THROWS_AS(pool.apply<die_now>(1L), procpool::WorkerLost);
      if (i % 2 == 0) pool.terminate();  // else the destructor does it
    }
  }
  CHECK(test::read_lines(marker).empty());
  CHECK(sorted_children() == children_before);
}

// ---- destruction ----------------------------------------------------------------------

POOL_TEST("destroying a pool with work in flight is prompt and leaves no child or fd behind",
          "[lifecycle][destructor]") {
  test::TempDir dir;
  Announcements started(dir / "started");
  const auto fds_before = test::open_fd_count();
  const auto children_before = sorted_children();
  std::vector<int> workers;
  Clock::time_point t0;
  {
    procpool::Pool pool(test::options<TestType>({.processes = 2}));
    auto a = pool.apply_async<announce_then_sleep>(started.path(), 30);
    auto b = pool.apply_async<announce_then_sleep>(started.path(), 30);
    auto c = pool.map_async<nap>(std::vector<int>(10, 30'000), 1);
    workers = {started.next(), started.next()};
    REQUIRE(workers[0] > 0);
    REQUIRE(workers[1] > 0);
    t0 = Clock::now();
  }
  CHECK(Clock::now() - t0 < 10s);
  for (int pid : workers) CHECK_FALSE(running(pid));
  CHECK(sorted_children() == children_before);
  CHECK(test::open_fd_count() == fds_before);

  // many lifecycles, some ending busy, some idle, some after close/join
  for (int i = 0; i < 50; ++i) {
    CAPTURE(i);
    procpool::Pool pool(test::options<TestType>({.processes = 2}));
    if (i % 3 == 0) {
      (void)pool.apply_async<nap>(30'000);
      (void)pool.map_async<nap>(std::vector<int>(4, 30'000), 1);
    } else if (i % 3 == 1) {
      CHECK(pool.map<squared>(iota_vec(20), 3) == squares_of(iota_vec(20)));
    } else {
      CHECK(pool.apply<squared>(static_cast<long>(i)) == i * i);
      pool.close();
      pool.join();
    }
  }
  CHECK(sorted_children() == children_before);
  CHECK(test::open_fd_count() == fds_before);
}

POOL_TEST("an exception unwinding through a pool's scope stops it cleanly", "[lifecycle][destructor]") {
  test::TempDir dir;
  Announcements started(dir / "started");
  const auto fds_before = test::open_fd_count();
  const auto children_before = sorted_children();
  int worker = 0;
  Clock::time_point t0;
  try {
    procpool::Pool pool(test::options<TestType>({.processes = 2}));
    auto busy = pool.apply_async<announce_then_sleep>(started.path(), 30);
    worker = started.next();
    REQUIRE(worker > 0);
    t0 = Clock::now();
    throw std::runtime_error("the caller gave up");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()) == "the caller gave up");
  }
  CHECK(Clock::now() - t0 < 10s);
  CHECK_FALSE(running(worker));
  CHECK(sorted_children() == children_before);
  CHECK(test::open_fd_count() == fds_before);
}

POOL_TEST("results that outlive their pool fail with PoolNotRunning instead of hanging", "[lifecycle][destructor]") {
  test::TempDir dir;
  Announcements started(dir / "started");
  procpool::AsyncResult<long> finished;
  procpool::AsyncResult<int> unfinished;
  procpool::AsyncResult<std::vector<long>> unfinished_map;
  Clock::time_point t0;
  {
    procpool::Pool pool(test::options<TestType>({.processes = 2}));
    finished = pool.apply_async<squared>(6L);
    finished.wait();
    unfinished = pool.apply_async<announce_then_sleep>(started.path(), 30);
    unfinished_map = pool.map_async<squared>(iota_vec(100), 1);
    REQUIRE(started.next() > 0);
    t0 = Clock::now();
  }
  CHECK(finished.get() == 36);
  CHECK_THROWS_AS(unfinished.get(), procpool::PoolNotRunning);
  CHECK(unfinished.ready());
  CHECK_FALSE(unfinished.successful());
  // the map either finished before the pool went or fails the same way
  std::optional<std::vector<long>> map_values;
  try {
    map_values = unfinished_map.get();
  } catch (const procpool::PoolNotRunning&) {
    CHECK_FALSE(unfinished_map.successful());
  }
  if (map_values) CHECK(*map_values == squares_of(iota_vec(100)));
  CHECK(Clock::now() - t0 < 10s);
}

POOL_TEST("an imap that outlives its pool fails with PoolNotRunning instead of hanging",
          "[lifecycle][destructor][imap]") {
  auto make = [] {
    // 16 chunks ahead: the rest of the input is still to be sent when the
    // pool goes (with the default prefetch of 1024 all of it would be sent
    // at once, and a fast pair of workers could finish it first).
    procpool::Pool pool(test::options<TestType>({.processes = 2, .imap_prefetch = 16}));
    auto results = pool.imap<squared>(iota_vec(1000), 1);
    CHECK(results.next() == 0);
    return results;
  };
  auto results = make();
  auto t0 = Clock::now();
  long count = 0;
  bool failed = false;
  try {
    while (auto v = results.next()) {
      ++count;
      CHECK(*v == count * count);
    }
  } catch (const procpool::PoolNotRunning&) {
    failed = true;
  }
  CHECK(Clock::now() - t0 < 10s);
  CHECK(failed);  // 999 items cannot all have run before the pool went
}

// ---- sizing and concurrency ------------------------------------------------------------

POOL_TEST("processes = 0 means one worker per CPU", "[lifecycle][processes]") {
  procpool::Options options = test::options<TestType>();
  options.processes = 0;  // test::options would pick 2
  procpool::Pool pool(options);
  CHECK(pool.processes() == procpool::cpu_count());
  CHECK(procpool::cpu_count() >= 1);
  std::set<int> pids;
  for (int pid : pool.map<pid_after>(std::vector<int>(4 * procpool::cpu_count(), 10), 1)) pids.insert(pid);
  CHECK(pids.size() <= procpool::cpu_count());
  CHECK(pool.map<squared>(iota_vec(100)) == squares_of(iota_vec(100)));
}

POOL_TEST("several threads can submit to one pool at once", "[lifecycle][threads]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  constexpr int threads = 4;
  std::vector<std::vector<long>> inputs, mapped(threads), streamed(threads), applied(threads);
  for (int t = 0; t < threads; ++t) inputs.push_back(iota_vec(500 + 100 * t, 10'000L * t));
  std::vector<std::string> errors(threads);
  std::vector<std::thread> pool_users;
  for (int t = 0; t < threads; ++t) {
    pool_users.emplace_back([&, t] {
      const auto k = static_cast<std::size_t>(t);
      try {
        const auto& in = inputs[k];
        mapped[k] = pool.map<squared>(in, k + 1);
        for (long v : pool.imap<squared>(in, 7)) streamed[k].push_back(v);
        std::vector<procpool::AsyncResult<long>> async;
        for (std::size_t i = 0; i < 20; ++i) async.push_back(pool.apply_async<squared>(in[i]));
        for (auto& r : async) applied[k].push_back(r.get());
      } catch (const std::exception& e) {
        errors[k] = e.what();  // Catch2's assertions are for the test's own thread
      }
    });
  }
  for (auto& th : pool_users) th.join();
  for (std::size_t t = 0; t < threads; ++t) {
    CAPTURE(t);
    CHECK(errors[t].empty());
    auto expected = squares_of(inputs[t]);
    CHECK(mapped[t] == expected);
    CHECK(streamed[t] == expected);
    CHECK(applied[t] == std::vector<long>(expected.begin(), expected.begin() + 20));
  }
}

POOL_TEST("assigning over a pool terminates the old one at once, as destroying it does", "[lifecycle]") {
  procpool::Pool pool(test::options<TestType>());
  auto slow = pool.apply_async<nap>(60'000);
  pool = procpool::Pool(test::options<TestType>());
  // The old pool's unfinished task fails now, not after its 60 s.
  CHECK_THROWS_AS(slow.get(std::chrono::seconds(20)), procpool::PoolNotRunning);
  CHECK(pool.apply<squared>(3L) == 9);
}

POOL_TEST("a pool closed and joined as soon as it is made runs its initializer once in each worker",
          "[lifecycle][initializer]") {
  test::TempDir dir;
  {
    procpool::Pool pool(
        test::options<TestType>({.processes = 3, .initializer = procpool::initializer<record_init>(dir.path(), 1L)}));
    pool.close();
    pool.join();
    CHECK(dir.files().size() == 3);
  }
  CHECK(dir.files().size() == 3);
}

POOL_TEST("imap and map agree on a closed pool, even with an empty input", "[lifecycle][close]") {
  procpool::Pool pool(test::options<TestType>());
  pool.close();
  CHECK_THROWS_AS(pool.map<squared>(std::vector<long>{}), procpool::PoolNotRunning);
  CHECK_THROWS_AS(pool.imap<squared>(std::vector<long>{}), procpool::PoolNotRunning);
  CHECK_THROWS_AS(pool.imap_unordered<squared>(std::vector<long>{}), procpool::PoolNotRunning);
  CHECK_THROWS_AS(pool.imap<squared>(iota_vec(3)), procpool::PoolNotRunning);
  pool.join();
}

POOL_TEST("destroying a pool while another thread is inside map ends that call with PoolNotRunning",
          "[lifecycle][destructor][threads]") {
  for (int round = 0; round < 3; ++round) {
    std::unique_ptr<procpool::Pool> pool = std::make_unique<procpool::Pool>(test::options<TestType>());
    std::promise<void> running;
    std::atomic<bool> signalled{false};
    std::exception_ptr error;
    std::size_t results = 0;
    std::thread caller([&] {
      try {
        // Large enough that it is still encoding and collecting when the pool goes.
        results = pool->map<slow_squared>(iota_vec(20000), {.chunksize = 1,
                                                            .progress =
                                                                [&](std::size_t, auto) {
                                                                  if (!signalled.exchange(true)) running.set_value();
                                                                }})
                      .size();
      } catch (...) {
        error = std::current_exception();
      }
    });
    running.get_future().wait();
    pool.reset();  // the other thread is inside map
    caller.join();
    CHECK(results == 0);
    REQUIRE(error);
    CHECK_THROWS_AS(std::rethrow_exception(error), procpool::PoolNotRunning);
  }
}

POOL_TEST("terminate() stops a map that is still reading its slow input in another thread", "[lifecycle][terminate]") {
  // A sized input that takes 5 ms an item to read: map went on reading all
  // 2,000 items (10 s) after terminate(), and only then threw. Nor did any
  // task start before it had read them all.
  procpool::Pool pool(test::options<TestType>());
  std::atomic<long> read{0};
  auto slow = tv::iota(0L, 2000L) | tv::transform([&read](long x) {
                std::this_thread::sleep_for(std::chrono::milliseconds(5));
                ++read;
                return x;
              });
  std::atomic<std::size_t> done{0};
  std::string error;
  std::thread caller([&] {
    try {
      pool.map([](long x) { return x; }, slow,
               {.chunksize = 1, .progress = [&done](std::size_t n, auto) { done = n; }});
    } catch (const procpool::PoolNotRunning& e) {
      error = e.what();
    }
  });
  while (read < 200) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK(done > 0);  // tasks ran while the input was being read
  pool.terminate();
  caller.join();
  CHECK(read < 1000);
  CHECK_THAT(error, Catch::Contains("the pool was terminated while map read its input"));
}

/// What a child made by fork() found, one bit each (test below).
enum ForkChild : int {
  apply_refused = 1,
  get_refused = 2,
  wait_refused = 4,
  join_refused = 8,
  new_pool_works = 16,
  finished_refused = 32,
  imap_refused = 64,
};

std::vector<char> bytes_of(int n) { return std::vector<char>(static_cast<std::size_t>(n), 'x'); }

/// What the child does with its copies: each use must throw, and letting go of them must
/// leave the parent's workers and buffers alone.
struct CopiesInChild {
  std::optional<procpool::Pool> pool;
  std::optional<procpool::AsyncResult<std::vector<long>>> running;
  std::optional<procpool::AsyncResult<std::vector<std::vector<char>>>> finished;  // in shared memory
  std::optional<procpool::IMap<long>> lazy;
  std::atomic<int> reads{0};  // of the IMap's input
};

int use_copies_in_child(CopiesInChild& c, procpool::StartMethod method) {
  int found = 0;
  auto refused = [](auto&& call) {
    try {
      call();
    } catch (const procpool::PoolNotRunning& e) {
      return std::strstr(e.what(), "is a copy of it made by fork()") != nullptr;
    }
    return false;
  };
  if (refused([&] { c.pool->apply<squared>(3L); })) found |= apply_refused;
  if (refused([&] { c.running->get(); })) found |= get_refused;
  if (refused([&] { procpool::wait(std::vector{*c.running}, 1h); })) found |= wait_refused;
  if (refused([&] { c.finished->get(); })) found |= finished_refused;
  // What the IMap had received is handed out; the next read would need the pool.
  const int reads = c.reads;
  if (refused([&] {
        while (c.lazy->next()) {
        }
      }) &&
      c.reads == reads) {
    found |= imap_refused;
  }
  if (refused([&] {
        c.pool->close();
        c.pool->join();
      })) {
    found |= join_refused;
  }
  c.pool->terminate();  // does nothing here
  c.lazy.reset();       // nor do the destructors: the workers and buffers are the parent's
  c.finished.reset();
  c.running.reset();
  c.pool.reset();
  procpool::Pool fresh({.processes = 1, .start_method = method});
  if (fresh.apply<squared>(7L) == 49) found |= new_pool_works;
  return found;
}

// Named "fork in a ..." to stay out of the sanitizer runs (scripts/test.sh):
// their allocators are not safe to fork() from a threaded program.
POOL_TEST("fork in a program with a pool: the child's copy refuses work and leaves the parent's workers be",
          "[lifecycle][fork_child]") {
  // The child's exit ran the pool's destructor there, which stopped the
  // parent's workers (its running tasks failed with WorkerLost, SIGTERM) or
  // its fork server (11 s); a call in the child waited for ever, and a
  // result in shared memory crashed it.
  CopiesInChild c;
  c.pool.emplace(test::options<TestType>());
  c.finished = c.pool->map_async<bytes_of>(std::vector<int>(2, 1 << 20), 1);
  REQUIRE(c.finished->wait(30s));
  c.lazy.emplace(c.pool->imap<squared>(tv::iota(0L, 100000L) | tv::transform([&c](long x) {
                                         ++c.reads;
                                         return x;
                                       })));
  CHECK(c.lazy->next() == 0L);
  c.running = c.pool->map_async<nap>(std::vector<int>(4, 300), 1);
  std::this_thread::sleep_for(50ms);
  const auto forked = Clock::now();
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) ::_exit(use_copies_in_child(c, TestType::method));
  int status = 0;
  while (::waitpid(child, &status, WNOHANG) == 0 && Clock::now() - forked < 30s) std::this_thread::sleep_for(5ms);
  if (::waitpid(child, &status, WNOHANG) == 0) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
    FAIL("the child hung");
  }
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) ==
        (apply_refused | get_refused | wait_refused | join_refused | new_pool_works | finished_refused | imap_refused));
  CHECK(Clock::now() - forked < 10s);
  CHECK(c.running->get(10s) == std::vector<long>(4, 300));  // the parent's tasks ran on
  CHECK(c.finished->get() == std::vector<std::vector<char>>(2, bytes_of(1 << 20)));
  CHECK(c.lazy->next() == 1L);
  CHECK(c.pool->apply<squared>(5L) == 25);
}

// Named "fork in a ..." to stay out of the sanitizer runs, as above.
POOL_TEST("fork in a program with a pool: a live child does not hold up close() and join()",
          "[lifecycle][fork_child]") {
  // The child holds copies of the pipes to the workers (and to the fork
  // server). A worker waited for end-of-file on its task pipe, which never
  // came while the child lived: join() waited for the child's exit.
  for (auto output : {procpool::WorkerOutput::inherit, procpool::WorkerOutput::lines}) {
    procpool::Pool pool(test::options<TestType>({.worker_output = output}));
    CHECK(pool.map<squared>(iota_vec(10)) == test::squares(10));
    int gate[2];
    REQUIRE(::pipe2(gate, O_CLOEXEC) == 0);
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      ::close(gate[1]);
      char byte;
      [[maybe_unused]] auto n = ::read(gate[0], &byte, 1);  // until the parent is done
      ::_exit(0);
    }
    ::close(gate[0]);
    const auto begun = Clock::now();
    auto joined = std::async(std::launch::async, [&] {
      pool.close();
      pool.join();
    });
    const bool in_time = joined.wait_for(20s) == std::future_status::ready;
    ::close(gate[1]);  // the child exits
    int status = 0;
    ::waitpid(child, &status, 0);
    joined.get();
    CHECK(in_time);
    CHECK(Clock::now() - begun < 20s);
  }
}

}  // namespace lifecycle_test

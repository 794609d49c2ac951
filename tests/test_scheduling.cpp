// No task waits on a busy worker while another idles: tasks queued behind a
// long (stopped, looping, dying) task are taken back and run elsewhere,
// exactly once (claims.hpp).
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"

using namespace std::chrono_literals;

// A named namespace: a worker finds a task by its type's name, and other
// test files have helpers of the same names.
namespace scheduling_test {

long tiny(long x) { return x + 1; }

/// Records its pid in `dir`/busy, then runs until `dir`/release exists:
/// sleeping, or spinning.
long hold(std::string dir, bool spin) {
  test::append_line(dir + "/busy", std::to_string(::getpid()));
  while (::access((dir + "/release").c_str(), F_OK) != 0) {
    if (!spin) std::this_thread::sleep_for(1ms);
  }
  return -1;
}

/// Appends its item to `dir`/runs: how often each item ran.
long record(std::string dir, long x) {
  test::append_line(dir + "/runs", std::to_string(x));
  return x * 2;
}

/// Waits (up to a minute) until `path` has a line; returns it.
std::string first_line(const std::string& path) {
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  for (;;) {
    auto lines = test::read_lines(path);
    if (!lines.empty()) return lines.front();
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(1ms);
  }
}

std::size_t length_of(const std::vector<char>& data) { return data.size(); }

/// How often each item ran, from `dir`/runs.
std::map<long, int> runs(const test::TempDir& dir) {
  std::map<long, int> count;
  for (const auto& line : test::read_lines(dir / "runs")) ++count[std::stol(line)];
  return count;
}

enum class Busy { sleeping, spinning, stopped };

/// Pool of 2, warmed with short tasks (so several are sent to a worker at
/// once), one worker then kept busy: a map of 40 items must finish, each item
/// run once, while that worker is still busy.
template <class Method>
void short_tasks_pass_a_busy_worker(Busy busy) {
  test::TempDir dir;
  procpool::Pool pool(test::options<Method>({.processes = 2}));
  for (int round = 0; round < 5; ++round) pool.map<tiny>(std::vector<long>(200, 1), 1);
  auto long_one = pool.apply_async<hold>(dir.path(), busy == Busy::spinning);
  const int busy_pid = std::stoi(first_line(dir / "busy"));
  if (busy == Busy::stopped) REQUIRE(::kill(busy_pid, SIGSTOP) == 0);
  std::vector<std::tuple<std::string, long>> items;
  for (long i = 0; i < 40; ++i) items.emplace_back(dir.path(), i);
  auto mapped = pool.starmap_async<record>(items, 1);
  const bool finished = mapped.wait(60s);
  if (busy == Busy::stopped) ::kill(busy_pid, SIGCONT);
  test::append_line(dir / "release", "go");
  REQUIRE(finished);
  auto values = mapped.get();
  for (long i = 0; i < 40; ++i) CHECK(values[static_cast<std::size_t>(i)] == 2 * i);
  auto count = runs(dir);
  CHECK(count.size() == 40);
  for (const auto& [item, times] : count) {
    INFO("item " << item);
    CHECK(times == 1);
  }
  CHECK(long_one.get(60s) == -1);
}

}  // namespace scheduling_test

namespace scheduling_test {

POOL_TEST("short tasks do not wait behind a long one while a worker idles", "[scheduling]") {
  short_tasks_pass_a_busy_worker<TestType>(Busy::sleeping);
}

POOL_TEST("short tasks do not wait behind a looping task", "[scheduling]") {
  short_tasks_pass_a_busy_worker<TestType>(Busy::spinning);
}

POOL_TEST("short tasks do not wait behind a stopped worker", "[scheduling]") {
  short_tasks_pass_a_busy_worker<TestType>(Busy::stopped);
}

POOL_TEST("tasks taken back from a busy worker run exactly once, whatever it does next", "[scheduling][stress]") {
  test::TempDir dir;
  procpool::Pool pool(test::options<TestType>({.processes = 3}));
  long next = 0;
  for (int round = 0; round < 6; ++round) {
    test::TempDir hold_dir;
    pool.map<tiny>(std::vector<long>(300, 1), 1);  // short tasks: several in flight per worker
    auto long_one = pool.apply_async<hold>(hold_dir.path(), false);
    const int busy_pid = std::stoi(first_line(hold_dir / "busy"));
    std::vector<std::tuple<std::string, long>> items;
    for (int i = 0; i < 150; ++i) items.emplace_back(dir.path(), next++);
    auto mapped = pool.starmap_async<record>(items, 1);
    if (round % 2 == 1) {
      // The busy worker dies while its queue is being taken back.
      ::kill(busy_pid, SIGKILL);
      CHECK_THROWS_AS(long_one.get(60s), procpool::WorkerLost);
    }
    REQUIRE(mapped.wait(60s));
    test::append_line(hold_dir / "release", "go");
    CHECK(mapped.get().size() == 150);
    if (round % 2 == 0) CHECK(long_one.get(60s) == -1);
  }
  auto count = runs(dir);
  CHECK(count.size() == static_cast<std::size_t>(next));
  for (const auto& [item, times] : count) {
    INFO("item " << item);
    CHECK(times == 1);
  }
}

long own_pid() { return ::getpid(); }

/// Records its item and pid in `dir`/runs and `dir`/pids, after `ms` ms.
long record_pid(std::string dir, long x, int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  test::append_line(dir + "/pids", std::to_string(::getpid()));
  return record(dir, x);
}

POOL_TEST("tasks sent to a worker stopped while idle run on another, once", "[scheduling]") {
  // The stopped worker never read its tasks: they were not taken back, for
  // it had not started the first, and the map waited for ever.
  test::TempDir dir;
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  pool.map<tiny>(std::vector<long>(200, 1), 1);
  const long stopped = pool.apply<own_pid>();  // idle again once it answered
  REQUIRE(::kill(static_cast<pid_t>(stopped), SIGSTOP) == 0);
  std::vector<std::tuple<std::string, long, int>> items;
  for (long i = 0; i < 40; ++i) items.emplace_back(dir.path(), i, 0);
  auto mapped = pool.starmap_async<record_pid>(items, 1);
  const bool finished = mapped.wait(60s);
  ::kill(static_cast<pid_t>(stopped), SIGCONT);
  REQUIRE(finished);
  CHECK(mapped.get().size() == 40);
  auto count = runs(dir);
  CHECK(count.size() == 40);
  for (const auto& [item, times] : count) {
    INFO("item " << item);
    CHECK(times == 1);
  }
  // Going again, it skips the tasks taken back, and gets new ones.
  items.clear();
  for (long i = 40; i < 80; ++i) items.emplace_back(dir.path(), i, 20);
  CHECK(pool.starmap<record_pid>(items, 1).size() == 40);
  const auto pids = test::read_lines(dir / "pids");
  CHECK(std::count(pids.begin() + 40, pids.end(), std::to_string(stopped)) > 0);
}

long pause_ms(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return ms;
}

POOL_TEST("a worker that resumes after its tasks were taken back gets the queued tasks at once", "[scheduling]") {
  // It tells the pool nothing as it skips them: the pool waited for some
  // other news (here, the busy worker's answer) before it sent it more.
  test::TempDir dir;
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  pool.map<pause_ms>(std::vector<int>(10, 5), 1);  // tasks of 5 ms: one at a time per worker
  const long resumed = pool.apply<own_pid>();
  REQUIRE(::kill(static_cast<pid_t>(resumed), SIGSTOP) == 0);
  CHECK(pool.map<tiny>(std::vector<long>{1, 2}, 1) == std::vector<long>{2, 3});  // one was taken back
  auto busy = pool.apply_async<hold>(dir.path(), false);
  REQUIRE(first_line(dir / "busy") != std::to_string(resumed));
  auto queued = pool.apply_async<own_pid>();  // no worker takes it yet
  std::this_thread::sleep_for(50ms);
  ::kill(static_cast<pid_t>(resumed), SIGCONT);
  std::optional<long> ran_on;
  CHECK_NOTHROW(ran_on = queued.get(20s));  // while the other is still busy
  test::append_line(dir / "release", "go");
  CHECK(ran_on == resumed);
  CHECK(busy.get(60s) == -1);
}

POOL_TEST("a retiring worker stopped while idle does not hold up its successor", "[scheduling]") {
  // Its successor takes tasks once it has run its last ones: it was idle,
  // but the tasks were not taken back for it.
  procpool::Pool pool(test::options<TestType>({.processes = 1, .maxtasksperchild = 2}));
  const long stopped = pool.apply<own_pid>();
  REQUIRE(::kill(static_cast<pid_t>(stopped), SIGSTOP) == 0);
  auto result = pool.apply_async<tiny>(6L);
  std::optional<long> value;
  CHECK_NOTHROW(value = result.get(30s));
  ::kill(static_cast<pid_t>(stopped), SIGCONT);
  CHECK(value == 7L);
}

POOL_TEST("a task sent to the only worker, stopped while idle, runs on a new one after its timeout", "[scheduling]") {
  // One worker holds the task unread: no other is idle to take it. The
  // task's clock had not started (it never ran), so it waited for ever.
  procpool::Pool pool(test::options<TestType>({.processes = 1, .task_timeout = 300ms}));
  const long stopped = pool.apply<own_pid>();
  REQUIRE(::kill(static_cast<pid_t>(stopped), SIGSTOP) == 0);
  auto result = pool.apply_async<tiny>(6L);
  std::optional<long> value;
  CHECK_NOTHROW(value = result.get(30s));  // it never started: no TaskTimeout
  ::kill(static_cast<pid_t>(stopped), SIGCONT);
  CHECK(value == 7L);
  CHECK(pool.apply<own_pid>() != stopped);
}

TEST_CASE("a claim word is won by the worker or the pool, never both", "[scheduling][claims]") {
  auto area = procpool::detail::ClaimArea::create(8);
  REQUIRE(area);
  REQUIRE(area.slots() >= 512);
  // A worker in another process claims each task as it reads it from a pipe,
  // while this process takes back every other one at the same moment.
  constexpr std::uint64_t batch = 256, batches = 400;
  int to_child[2], to_parent[2];
  REQUIRE(::pipe2(to_child, O_CLOEXEC) == 0);
  REQUIRE(::pipe2(to_parent, O_CLOEXEC) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(to_child[1]);  // a parent that stops early is seen as EOF
    ::close(to_parent[0]);
    auto mine = procpool::detail::ClaimArea::adopt(::dup(area.fd()));
    std::uint64_t seq;
    std::vector<char> won(batch);
    for (std::uint64_t b = 0; b < batches; ++b) {
      for (std::uint64_t i = 0; i < batch; ++i) {
        if (::read(to_child[0], &seq, sizeof(seq)) != sizeof(seq)) ::_exit(2);
        won[i] = mine.claim(seq) ? 1 : 0;
      }
      if (::write(to_parent[1], won.data(), won.size()) != static_cast<ssize_t>(won.size())) ::_exit(3);
    }
    ::_exit(0);
  }
  ::close(to_child[0]);
  ::close(to_parent[1]);
  std::uint64_t both = 0, neither = 0, taken_back = 0;  // (which side wins each race varies)
  std::vector<char> child_won(batch);
  for (std::uint64_t b = 0; b < batches; ++b) {
    std::vector<char> parent_won(batch);
    for (std::uint64_t i = 0; i < batch; ++i) {
      const std::uint64_t seq = b * batch + i + 1;
      area.offer(seq);
      REQUIRE(::write(to_child[1], &seq, sizeof(seq)) == sizeof(seq));
      if (i % 2 == 0) parent_won[i] = area.revoke(seq) ? 1 : 0;
    }
    std::size_t got = 0;
    while (got < batch) {
      auto n = ::read(to_parent[0], child_won.data() + got, batch - got);
      REQUIRE(n > 0);
      got += static_cast<std::size_t>(n);
    }
    for (std::uint64_t i = 0; i < batch; ++i) {
      both += parent_won[i] && child_won[i];
      neither += !parent_won[i] && !child_won[i];
      taken_back += parent_won[i];
    }
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(both == 0);
  CHECK(neither == 0);
  CHECK(taken_back > 0);
  ::close(to_child[1]);
  ::close(to_parent[0]);
}

#if defined(PROCPOOL_SANITIZED)
#define PROCPOOL_TEST_NO_RLIMIT_AS 1
#endif

POOL_TEST("a task whose message a worker cannot read fails, and is not passed round the pool", "[scheduling][claims]") {
#ifdef PROCPOOL_TEST_NO_RLIMIT_AS
  WARN("RLIMIT_AS cannot be combined with a sanitizer's shadow memory; not checked in this build");
  return;
#endif
  // Through the pipe (no shared memory), 256 MiB do not fit in a worker limited to 128 MiB.
  procpool::Pool pool(test::options<TestType>(
      {.processes = 2, .memory_limit_per_child = std::size_t{128} << 20, .shared_memory_threshold = 0}));
  CHECK_THROWS_AS(pool.apply<length_of>(std::vector<char>(std::size_t{256} << 20, 'x')), procpool::Error);
  CHECK(pool.apply<length_of>(std::vector<char>(10, 'x')) == 10);
}

}  // namespace scheduling_test

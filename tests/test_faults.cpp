// Faults: crashes cost one task, retries, hard timeouts, memory caps, parent
// death, Ctrl-C, garbage on the result pipe, an input that throws, and many
// pool lifecycles.
#include <sys/resource.h>
#include <sys/stat.h>

#include <chrono>
#include <csignal>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <ranges>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "common.hpp"

namespace faults_test {

using namespace std::chrono_literals;

long crash_on_five(long x) {
  if (x == 5) {
    ::signal(SIGABRT, SIG_DFL);  // not the test runner's inherited handler
    std::abort();
  }
  return x * 2;
}

long always_crash(long) {
  ::raise(SIGKILL);
  return 0;
}

long hang_on_three(long x) {
  if (x == 3) std::this_thread::sleep_for(60s);
  return x;
}

long hang_ignoring_sigterm(long x) {
  ::signal(SIGTERM, SIG_IGN);
  std::this_thread::sleep_for(60s);
  return x;
}

/// Leaks 40 MiB of touched memory per call and reports the pid.
int leak_40mib(int) {
  static std::vector<std::vector<char>> kept;
  kept.emplace_back(40u << 20, 'x');
  return static_cast<int>(::getpid());
}

std::size_t allocate_gib(int) {
  std::vector<char> big(std::size_t{1} << 30, 'y');
  return big.size();
}

/// Allocates and touches `mib` MiB for the call; returns the pid.
int allocate_mib(long mib) {
  std::vector<char> block(static_cast<std::size_t>(mib) << 20, 'z');
  return block[block.size() / 2] == 'z' ? static_cast<int>(::getpid()) : 0;
}

/// Keeps `mib` MiB of touched memory for the rest of the worker's life; returns the pid.
int leak_mib(long mib) {
  static std::vector<std::vector<char>> kept;
  kept.emplace_back(static_cast<std::size_t>(mib) << 20, 'x');
  return static_cast<int>(::getpid());
}

int pid_of(int) { return static_cast<int>(::getpid()); }

std::size_t byte_count(const std::vector<char>& bytes) { return bytes.size(); }
std::vector<char> bytes_of(long mib) { return std::vector<char>(static_cast<std::size_t>(mib) << 20, 'b'); }

/// Writes garbage where the worker's results go (its only write-only pipe).
long scribble(long) {
  for (int fd = 3; fd < 256; ++fd) {
    int flags = ::fcntl(fd, F_GETFL);
    if (flags == -1 || (flags & O_ACCMODE) != O_WRONLY) continue;
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISFIFO(st.st_mode)) continue;
    const char garbage[] = "\xff\xff\xff\x7fnot a procpool frame at all";
    [[maybe_unused]] auto n = ::write(fd, garbage, sizeof(garbage));
  }
  std::this_thread::sleep_for(60s);
  return 0;
}

std::size_t string_length(const std::string& s) { return s.size(); }
long twice(long x) { return 2 * x; }

/// Outcome of each item of an imap, in order: the value, or the error type.
template <class R>
std::vector<std::string> outcomes(R&& results) {
  std::vector<std::string> out;
  auto it = results.begin();
  while (it != results.end()) {
    try {
      out.push_back(std::to_string(*it));
    } catch (const procpool::WorkerLost&) {
      out.push_back("WorkerLost");
    } catch (const procpool::TaskTimeout&) {
      out.push_back("TaskTimeout");
    } catch (const std::exception& e) {
      out.push_back(e.what());
    }
    ++it;
  }
  return out;
}

}  // namespace faults_test

namespace faults_test {

POOL_TEST("a crash costs exactly the task that was running", "[faults]") {
  // Short tasks, so several wait in each worker's pipe when item 5 crashes.
  procpool::Pool pool(test::options<TestType>());
  std::vector<long> in(40);
  std::iota(in.begin(), in.end(), 0L);
  auto got = outcomes(pool.imap<crash_on_five>(in));
  REQUIRE(got.size() == 40);
  for (long x = 0; x < 40; ++x) {
    CAPTURE(x);
    CHECK(got[static_cast<std::size_t>(x)] == (x == 5 ? "WorkerLost" : std::to_string(2 * x)));
  }
}

POOL_TEST("a crash or a timeout in a chunk names the item that was running", "[faults][timeout]") {
  // One chunk of 10: item 5 crashes. Each item's error says what became of
  // it, and names item 5. The first item's error (what map throws) named
  // itself as the one running.
  procpool::Pool pool(test::options<TestType>({.processes = 1, .task_timeout = 500ms}));
  std::vector<std::string> crashed;
  for (const auto& r : pool.imap<crash_on_five>(test::iota_vec(10), 10).results()) crashed.push_back(r.error_message());
  REQUIRE(crashed.size() == 10);
  for (std::size_t x = 0; x < 10; ++x) {
    CAPTURE(x, crashed[x]);
    CHECK_THAT(crashed[x], Catch::Contains("while running imap input #5, in the same chunk; the pool replaced it") ||
                               Catch::Contains("while running imap input #5; the pool replaced it"));
    if (x < 5)
      CHECK_THAT(crashed[x], Catch::StartsWith(fmt::format("procpool: imap input #{} ran, but its result "
                                                           "was lost with its chunk: worker 0",
                                                           x)));
    if (x > 5) CHECK_THAT(crashed[x], Catch::StartsWith(fmt::format("procpool: imap input #{} did not run", x)));
  }
  CHECK_THAT(crashed[5], Catch::StartsWith("procpool: worker 0"));
  auto lost = test::thrown<procpool::WorkerLost>([&] { pool.map<crash_on_five>(test::iota_vec(10), 10); });
  CHECK(lost.input_index() == 0);
  CHECK_THAT(lost.what(), Catch::Contains("map input #5"));
  // Item 3 of 6 hangs: the timeout bounds the chunk, and names the item that was running.
  std::vector<std::string> timed_out;
  for (const auto& r : pool.imap<hang_on_three>(test::iota_vec(6), 6).results()) timed_out.push_back(r.error_message());
  REQUIRE(timed_out.size() == 6);
  CHECK_THAT(timed_out[0], Catch::StartsWith("procpool: imap input #0 ran, but its result was lost: its chunk (imap "
                                             "inputs #0 to #5) ran longer than the task timeout (500 ms) in worker 0"));
  CHECK_THAT(timed_out[0], Catch::EndsWith(", while imap input #3 was running; the worker was stopped and replaced"));
  CHECK_THAT(timed_out[3], Catch::StartsWith("procpool: imap input #3 was running when its chunk (imap inputs #0 to "
                                             "#5) ran longer than the task timeout"));
  CHECK_THAT(timed_out[5], Catch::StartsWith("procpool: imap input #5 did not run: its chunk"));
  // A protocol failure is not a crash: each item's error names that item.
  std::vector<std::string> garbled;
  for (const auto& r : pool.imap<scribble>(std::vector<long>{0, 1, 2}, 3).results())
    garbled.push_back(r.error_message());
  REQUIRE(garbled.size() == 3);
  for (std::size_t x = 0; x < 3; ++x) {
    CHECK_THAT(garbled[x], Catch::StartsWith(fmt::format("procpool: imap input #{} failed", x)));
  }
}

POOL_TEST("retries run a task lost to a crash again, a bounded number of times", "[faults][retries]") {
  test::TempDir dir;
  {
    procpool::Pool pool(test::options<TestType>({.retries = 1}));
    std::vector<std::tuple<std::string, long>> in;
    for (long x = 0; x < 6; ++x) in.emplace_back(dir.path(), x);
    CHECK(pool.starmap<test::crash_once>(in, 1) == std::vector<long>{0, 1, 2, 3, 4, 5});
    CHECK(dir.files().size() == 6);  // each crashed once, then ran
  }
  procpool::Pool pool(test::options<TestType>({.retries = 2}));
  auto lost = test::thrown<procpool::WorkerLost>([&] { pool.apply<always_crash>(1L); });
  CHECK(lost.signal() == SIGKILL);
  CHECK_THAT(lost.what(), Catch::Contains("The task ran 3 times (retries = 2), and its worker was lost each time"));
  CHECK(pool.apply<twice>(21L) == 42);
  // Without retries, one crash is final.
  procpool::Pool strict(test::options<TestType>());
  test::TempDir fresh;
  CHECK_THROWS_AS(strict.apply<test::crash_once>(fresh.path(), 1L), procpool::WorkerLost);
}

POOL_TEST("a task over task_timeout is stopped and fails with TaskTimeout", "[faults][timeout]") {
  procpool::Pool pool(test::options<TestType>({.task_timeout = 300ms}));
  auto start = std::chrono::steady_clock::now();
  auto got = outcomes(pool.imap<hang_on_three>(std::vector<long>{0, 1, 2, 3, 4, 5, 6, 7}));
  CHECK(got == std::vector<std::string>{"0", "1", "2", "TaskTimeout", "4", "5", "6", "7"});
  CHECK(std::chrono::steady_clock::now() - start < 20s);  // not the task's 60 s
  auto timeout = test::thrown<procpool::TaskTimeout>([&] { pool.apply<hang_on_three>(3L); });
  CHECK_THAT(timeout.what(), Catch::Contains("300 ms"));
  CHECK_THAT(timeout.what(), Catch::Contains("task timeout"));
  // A task that ignores SIGTERM is SIGKILLed after the grace.
  CHECK_THROWS_AS(pool.apply<hang_ignoring_sigterm>(1L), procpool::TaskTimeout);
  CHECK(pool.apply<twice>(4L) == 8);
}

POOL_TEST("a worker over max_memory_per_child is replaced after its task", "[faults][memory]") {
  procpool::Pool pool(test::options<TestType>({.max_memory_per_child = 60u << 20}));
  // Each worker can hold one 40 MiB leak, not two: the second task pushes it
  // over the cap, so it exits after it. Nothing is lost.
  auto pids = pool.map<leak_40mib>(std::vector<int>(10, 0), 1);
  REQUIRE(pids.size() == 10);
  std::set<int> distinct(pids.begin(), pids.end());
  CHECK(distinct.size() >= 5);
  CHECK(pool.apply<twice>(1L) == 2);
}

#if defined(PROCPOOL_SANITIZED)
#define PROCPOOL_TEST_NO_RLIMIT_AS 1
#endif

POOL_TEST("memory_limit_per_child makes an allocation storm a clean bad_alloc", "[faults][memory]") {
#ifdef PROCPOOL_TEST_NO_RLIMIT_AS
  WARN("RLIMIT_AS cannot be combined with a sanitizer's shadow memory; not checked in this build");
  return;
#endif
  procpool::Pool pool(test::options<TestType>({.memory_limit_per_child = std::size_t{512} << 20}));
  auto error = test::thrown<procpool::RemoteError>([&] { pool.apply<allocate_gib>(0); });
  CHECK(error.type_name() == "std::bad_alloc");
  CHECK(pool.apply<twice>(5L) == 10);
}

POOL_TEST("after a task too large for memory_limit_per_child, small ones in the same shared buffer run",
          "[faults][memory]") {
#ifdef PROCPOOL_TEST_NO_RLIMIT_AS
  WARN("RLIMIT_AS cannot be combined with a sanitizer's shadow memory; not checked in this build");
  return;
#endif
  // The pool reuses the large task's idle buffer for the next tasks. A
  // worker mapped the whole buffer to read any of them, which its limit
  // refused: "cannot map /proc/.../fd/9: Cannot allocate memory".
  procpool::Pool pool(test::options<TestType>({.processes = 1, .memory_limit_per_child = std::size_t{256} << 20}));
  CHECK_THROWS_AS(pool.apply<byte_count>(std::vector<char>(std::size_t{400} << 20, 'a')), procpool::Error);
  const std::vector<std::vector<char>> small(8, std::vector<char>(std::size_t{1} << 20, 'b'));
  CHECK(pool.map<byte_count>(small, 1) == std::vector<std::size_t>(8, std::size_t{1} << 20));
}

POOL_TEST("max_memory_per_child counts what a worker holds alone, not what it shares with a forked parent",
          "[faults][memory]") {
  // 200 MiB the parent wrote: a forked worker maps them too, shared until
  // either writes them. They were counted, and every worker was replaced
  // after its first task.
  std::vector<char> held(std::size_t{200} << 20);
  std::memset(held.data(), 1, held.size());
  procpool::Pool pool(test::options<TestType>({.processes = 2, .max_memory_per_child = 100u << 20}));
  auto pids = pool.map<pid_of>(std::vector<int>(20, 0), 1);
  CHECK(std::set<int>(pids.begin(), pids.end()).size() <= 2);
  // What a worker holds alone still counts: 150 MiB kept is over the cap.
  const int leaky = pool.apply<leak_mib>(150L);
  for (int k = 0; k < 10; ++k) CHECK(pool.apply<pid_of>(0) != leaky);
  CHECK(held[12345] == 1);
}

POOL_TEST("memory_limit_per_child bounds what a worker's tasks add, and a worker that ran out is replaced",
          "[faults][memory]") {
#ifdef PROCPOOL_TEST_NO_RLIMIT_AS
  WARN("RLIMIT_AS cannot be combined with a sanitizer's shadow memory; not checked in this build");
  return;
#endif
  // 1 GiB of the parent's address space (reserved, never touched): under
  // fork it was counted against the workers' limit, and every allocation failed.
  std::unique_ptr<char[]> reserved(new char[std::size_t{1} << 30]);
  reserved[0] = 1;
  procpool::Pool pool(test::options<TestType>({.processes = 1, .memory_limit_per_child = std::size_t{512} << 20}));
  CHECK(pool.apply<allocate_mib>(100L) != 0);
  // A worker that keeps 350 MiB fails the next 250 MiB, saying why...
  const int leaky = pool.apply<leak_mib>(350L);
  auto error = test::thrown<procpool::RemoteError>([&] { pool.apply<allocate_mib>(250L); });
  CHECK(error.type_name() == "std::bad_alloc");
  CHECK_THAT(error.what(), Catch::Contains("Options::memory_limit_per_child is 512 MiB"));
  // ... and is replaced after that task: it would fail every one after it.
  const int next = pool.apply<allocate_mib>(250L);
  CHECK(next != 0);
  CHECK(next != leaky);
  // procpool's own caches are let go of after each task: a 200 MiB
  // argument, then a 200 MiB result, fit in 512 MiB one after the other.
  CHECK(pool.apply<byte_count>(std::vector<char>(std::size_t{200} << 20, 'a')) == std::size_t{200} << 20);
  CHECK(pool.apply<bytes_of>(200L).size() == std::size_t{200} << 20);
  // Nor does a large result's buffer stay mapped into the next task.
  CHECK(pool.apply<allocate_mib>(380L) != 0);
  CHECK(reserved[0] == 1);
}

POOL_TEST("garbage on the result pipe is a ProtocolError, and the pool goes on", "[faults][protocol]") {
  procpool::Pool pool(test::options<TestType>());
  auto error = test::thrown<procpool::ProtocolError>([&] { pool.apply<scribble>(0L); });
  CHECK_THAT(error.what(), Catch::Contains("max_message_bytes"));
  CHECK(pool.map<twice>(std::vector<long>{1, 2, 3}) == std::vector<long>{2, 4, 6});
}

POOL_TEST("an imap input that throws yields what came before, then its error", "[faults][input]") {
  procpool::Pool pool(test::options<TestType>());
  for (std::size_t chunksize : {std::size_t{1}, std::size_t{4}}) {
    CAPTURE(chunksize);
    auto failing = tv::iota(0L, 100L) | tv::transform([](long x) {
                     if (x == 10) throw std::runtime_error("input broke at 10");
                     return x;
                   });
    std::vector<long> seen;
    std::string error;
    auto results = pool.imap<twice>(failing, chunksize);
    try {
      for (long v : results) seen.push_back(v);
    } catch (const std::runtime_error& e) {
      error = e.what();
    }
    CHECK(error == "input broke at 10");
    CHECK(seen == std::vector<long>{0, 2, 4, 6, 8, 10, 12, 14, 16, 18});
  }
  // map reads its input first, so the input's error comes before any work.
  auto failing = tv::iota(0L, 100L) | tv::filter([](long x) {
                   if (x == 50) throw std::runtime_error("filter broke");
                   return true;
                 });
  CHECK_THROWS_WITH(pool.map<twice>(failing), "filter broke");
  CHECK(pool.apply<twice>(2L) == 4);
  // A sized input is sent in batches as it is encoded: here the first
  // batches are already running when the input breaks. The caller gets the
  // input's error; what was sent is dropped, and the pool goes on.
  auto breaks_late = tv::iota(0, 8) | tv::transform([](int x) {
                       if (x == 5) throw std::runtime_error("input broke at 5");
                       return std::string(std::size_t{512} << 10, static_cast<char>('a' + x));
                     });
  CHECK_THROWS_WITH(pool.map<string_length>(breaks_late, 1), "input broke at 5");
  CHECK(pool.map<string_length>(std::vector<std::string>{"ab", "c"}, 1) == std::vector<std::size_t>{2, 1});
  CHECK(pool.map<twice>(std::vector<long>{1, 2, 3}) == std::vector<long>{2, 4, 6});
}

POOL_TEST("1,000 pool lifecycles leave no fd and no child behind", "[faults][lifecycle]") {
  const auto fds = test::open_fd_count();
  const auto children = test::child_pids().size();
  for (int i = 0; i < 1000; ++i) {
    procpool::Pool pool(test::options<TestType>({.processes = 1}));
    if (i % 100 == 0) REQUIRE(pool.apply<twice>(static_cast<long>(i)) == 2L * i);
  }
  CHECK(test::open_fd_count() == fds);
  CHECK(test::child_pids().size() == children);
}

/// A helper program run in the background, read line by line.
struct Background {
  pid_t pid = -1;
  int out = -1;
  explicit Background(std::vector<std::string> args) {
    int p[2];
    REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::dup2(p[1], 1);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(p[1]);
    out = p[0];
  }
  ~Background() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
    ::close(out);
  }
  /// The worker pids the helper prints ("pids 1 2 3").
  std::vector<int> worker_pids() {
    std::string line;
    char c;
    while (::read(out, &c, 1) == 1 && c != '\n') line += c;
    std::istringstream words(line);
    std::string word;
    words >> word;
    REQUIRE(word == "pids");
    std::set<int> pids;
    for (int p; words >> p;) pids.insert(p);
    return {pids.begin(), pids.end()};
  }
  /// Waits (bounded) for the helper to end; its wait status.
  int wait(std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    while (::waitpid(pid, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) return -1;
      ::usleep(5000);
    }
    pid = -1;
    return status;
  }
};

POOL_TEST("workers and any fork server die with a parent killed by SIGKILL", "[faults][orphans]") {
  Background helper({PROCPOOL_HELPER, "orphan", std::string(procpool::to_string(TestType::method))});
  auto workers = helper.worker_pids();
  REQUIRE(workers.size() == 2);
  int status = helper.wait(10s);
  REQUIRE(status != -1);
  CHECK((WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL));
  CHECK(test::all_stop_running(workers, 5s));
}

POOL_TEST("Ctrl-C during a map ends the program promptly and leaves no worker", "[faults][sigint]") {
  Background helper({PROCPOOL_HELPER, "interrupt", std::string(procpool::to_string(TestType::method))});
  auto workers = helper.worker_pids();
  REQUIRE(workers.size() == 2);
  // As the terminal does: SIGINT to the whole foreground process group.
  REQUIRE(::kill(-helper.pid, SIGINT) == 0);
  int status = helper.wait(10s);
  REQUIRE(status != -1);
  CHECK((WIFSIGNALED(status) && WTERMSIG(status) == SIGINT));
  CHECK(test::all_stop_running(workers, 5s));
}

}  // namespace faults_test

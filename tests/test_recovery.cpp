// A worker that cannot be started (out of fds, out of processes, a dead fork
// server) costs only the tasks that cannot get a worker, with an error that
// names the cause; the pool keeps trying and recovers once it can. An
// initializer that crashes is reported as such, not as a missing init().
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdint>
#include <filesystem>

#include <chrono>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"

using namespace std::chrono_literals;

// A named namespace: a worker finds a task by its type's name, and other
// test files have helpers of the same names.
namespace recovery_test {

long sq(long x) { return x * x; }

using test::iota_vec;
using test::squares;

/// Lowers the soft fd limit to the highest fd open now and fills the free
/// numbers below it: no new fd can be made until this is destroyed.
class NoNewFds {
 public:
  NoNewFds() {
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved_) == 0);
    rlimit low = saved_;
    low.rlim_cur = highest_open_fd() + 1;
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
    fill();
  }
  /// Takes the numbers freed since (by workers that exited).
  void fill() {
    for (int fd; (fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0;) fillers_.push_back(fd);
    REQUIRE(errno == EMFILE);
  }
  NoNewFds(const NoNewFds&) = delete;
  NoNewFds& operator=(const NoNewFds&) = delete;
  ~NoNewFds() {
    for (int fd : fillers_) ::close(fd);
    ::setrlimit(RLIMIT_NOFILE, &saved_);
  }

 private:
  static rlim_t highest_open_fd() {
    int highest = 2;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
      highest = std::max(highest, std::stoi(entry.path().filename().string()));
    }
    return static_cast<rlim_t>(highest);
  }
  rlimit saved_{};
  std::vector<int> fillers_;
};

/// The worker's result pipe: its only write-only pipe above 2.
int result_fd() {
  for (int fd = 3; fd < 256; ++fd) {
    int flags = ::fcntl(fd, F_GETFL);
    if (flags == -1 || (flags & O_ACCMODE) != O_WRONLY) continue;
    struct stat st {};
    if (::fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode)) return fd;
  }
  return -1;
}

/// Writes the header of a result frame of 1000 bytes, sends none of them,
/// and returns: the parent then reads the real result as that frame's first
/// bytes, and nothing more comes.
long false_header(long x) {
  const std::uint32_t header[2] = {1000, 4};
  [[maybe_unused]] auto n = ::write(result_fd(), header, sizeof(header));
  return x;
}

/// Writes two bytes, less than a frame header, and returns.
long partial_header(long x) {
  [[maybe_unused]] auto n = ::write(result_fd(), "\x10\x00", 2);
  return x;
}

procpool::SharedMemory shared_block(std::size_t n) {
  procpool::SharedMemory block(n);
  block.as<char>()[0] = 's';
  return block;
}

void crash_in_initializer() { ::raise(SIGSEGV); }
void abort_in_initializer() { std::abort(); }
void exit_in_initializer() { ::_exit(3); }

}  // namespace recovery_test

namespace recovery_test {

POOL_TEST("a worker that cannot be started for want of fds fails only the tasks without one, then the pool recovers",
          "[recovery][emfile]") {
  // Each worker is replaced after one task: every task needs a new worker.
  procpool::Pool pool(test::options<TestType>({.processes = 1, .maxtasksperchild = 1}));
  REQUIRE(pool.apply<sq>(2L) == 4);
  std::string what;
  {
    NoNewFds guard;
    // The worker started before the limit still runs a task; the next needs a new one.
    // A worker that exits meanwhile frees fds: each attempt takes those first.
    for (int attempt = 0; attempt < 20 && what.empty(); ++attempt) {
      guard.fill();
      try {
        const long v = pool.apply<sq>(3L);
        CHECK(v == 9);
      } catch (const procpool::Error& e) {
        what = e.what();
      }
    }
  }
  INFO(what);
  CHECK_THAT(what, Catch::Contains("Too many open files"));
  CHECK_THAT(what, Catch::Contains("could not start worker"));
  // The limit is back: the pool starts workers again, on its own.
  CHECK(pool.map<sq>(iota_vec(10), 1) == squares(10));
  CHECK(pool.apply<sq>(5L) == 25);
}

POOL_TEST("a SharedMemory result this process cannot map fails at once, and the next one arrives",
          "[recovery][emfile][shared_memory]") {
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  REQUIRE(pool.apply<shared_block>(std::size_t{4096}).as<char>()[0] == 's');
  std::string what;
  std::chrono::steady_clock::duration took{};
  {
    NoNewFds guard;
    const auto start = std::chrono::steady_clock::now();
    try {
      (void)pool.apply<shared_block>(std::size_t{4096});
    } catch (const procpool::Error& e) {
      what = e.what();
    }
    took = std::chrono::steady_clock::now() - start;
  }
  INFO(what);
  CHECK_THAT(what, Catch::Contains("cannot map the block of 4096 bytes"));
  CHECK_THAT(what, Catch::Contains("Too many open files"));
  // The worker learns of the refusal from the pool, and does not wait out its
  // 5 s for a mark that cannot come (a bound for that, not a timing).
  CHECK(took < 4s);
  CHECK(pool.apply<shared_block>(std::size_t{4096}).as<char>()[0] == 's');
}

POOL_TEST("a pool works at a soft fd limit of 10, and fails clearly at 9", "[recovery][emfile]") {
  // 10 is the fewest fds a pool of two can run in: the workers' starts take
  // no fd beyond their pipes, in this process and in the fork server.
  auto run =
      test::run_program({PROCPOOL_HELPER, "fewfds", std::string(procpool::to_string(TestType::method)), "10"}, 60000);
  INFO(run.output);
  CHECK(WIFEXITED(run.status));
  CHECK(run.output == "squares ok\nbig ok\n");
  run = test::run_program({PROCPOOL_HELPER, "fewfds", std::string(procpool::to_string(TestType::method)), "9"}, 60000);
  INFO(run.output);
  CHECK_THAT(run.output, Catch::Contains("could not start worker 0"));
  CHECK_THAT(run.output, Catch::Contains("Too many open files"));
}

POOL_TEST("tasks wait for a worker finishing its last task when its successor lacks fds", "[recovery][emfile]") {
  // The successor, started early, failed twice for want of fds while its
  // predecessor ran a 200 ms task, and the waiting tasks failed with it;
  // that worker's exit frees what the successor needs.
  auto run =
      test::run_program({PROCPOOL_HELPER, "successor", std::string(procpool::to_string(TestType::method))}, 60000);
  INFO(run.output);
  CHECK(WIFEXITED(run.status));
  CHECK(run.output == "slow ok\n");
}

POOL_TEST("Pool() with no fd free fails with a message naming the cause", "[recovery][emfile]") {
  // It said "eventfd: Too many open files", without procpool or what to do.
  std::string what;
  {
    NoNewFds none;
    try {
      procpool::Pool pool(test::options<TestType>());
    } catch (const std::system_error& e) {
      what = e.what();
    }
  }
  CHECK_THAT(what, Catch::StartsWith("procpool: the pool could not start, out of file descriptors (see ulimit -n): "));
  CHECK_THAT(what, Catch::EndsWith("Too many open files"));
  procpool::Pool pool(test::options<TestType>());
  CHECK(pool.apply<sq>(3L) == 9);
}

POOL_TEST("with the process limit reached, Pool() and worker starts fail with clear errors, and the pool recovers",
          "[recovery][nproc]") {
  // RLIMIT_NPROC does not bind root: the helper becomes a user of no other process first.
  auto run = test::run_program({PROCPOOL_HELPER, "nproc", std::string(procpool::to_string(TestType::method))}, 60000);
  INFO(run.output);
  CHECK(WIFEXITED(run.status));
  CHECK(WEXITSTATUS(run.status) == 0);
  CHECK_THAT(run.output, Catch::Contains("pool: procpool: could not start the pool's I/O thread"));
  CHECK_THAT(run.output, Catch::Contains("Resource temporarily unavailable"));
  CHECK_THAT(run.output, Catch::Contains("map: procpool: map input #0 was not run: the pool could not start worker"));
  CHECK_THAT(run.output, Catch::Contains("recovered: 0 1 4 9"));
}

TEST_CASE("a killed fork server is started again, and the pool goes on", "[recovery][forkserver]") {
  procpool::Pool pool(test::options<test::Forkserver>({.processes = 2}));
  REQUIRE(pool.map<sq>(iota_vec(20), 1) == squares(20));
  // The fork server is the pool's only child; its workers are its own.
  auto servers = test::child_pids();
  REQUIRE(servers.size() == 1);
  ::kill(servers[0], SIGKILL);
  REQUIRE(test::all_stop_running(servers, 10s));
  // Its workers died with it (idle: no task is lost); new ones come from a new server.
  CHECK(pool.map<sq>(iota_vec(20), 1) == squares(20));
  CHECK(pool.apply<sq>(7L) == 49);
  auto now = test::child_pids();
  REQUIRE(now.size() == 1);
  CHECK(now[0] != servers[0]);
  // A task running when the server dies fails saying so, not as a mere SIGKILL.
  auto running = pool.apply_async(
      [](long ms) {
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
        return ms;
      },
      30'000L);
  std::this_thread::sleep_for(300ms);
  ::kill(now[0], SIGKILL);
  auto lost = test::thrown<procpool::WorkerLost>([&] { running.get(); });
  CHECK_THAT(lost.what(), Catch::Contains("was lost with its fork server, which died"));
  CHECK(pool.apply<sq>(8L) == 64);
}

POOL_TEST("at the fd limit, a crashed worker's successor waits for the relay to free its pipes",
          "[recovery][emfile][output]") {
  // A pool of 2 with relayed output at the fewest fds it runs with: one
  // worker, the other's starts failing. When that worker crashed, its
  // successor's start could come before the output relay had closed the dead
  // worker's pipes: it failed too, and every task left failed at once.
  auto run =
      test::run_program({PROCPOOL_HELPER, "crashrelay", std::string(procpool::to_string(TestType::method))}, 90000);
  INFO(run.output);
  CHECK(WIFEXITED(run.status));
  CHECK(run.output == "crashed 5, lost 0\n");
}

TEST_CASE("in a subreaper or PID 1, a killed fork server's workers are still lost with it",
          "[recovery][forkserver][reaping]") {
  // The program inherits the dead server's workers and reaps them itself:
  // each was said to be "killed by signal 9", which its server's death did.
  auto run = test::run_program({PROCPOOL_HELPER, "killserver"}, 60000);
  INFO(run.output);
  CHECK(WIFEXITED(run.status));
  CHECK(WEXITSTATUS(run.status) == 0);
  std::vector<std::string> lines;
  std::istringstream in(run.output);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  REQUIRE(lines.size() == 3);
  for (std::size_t k = 0; k < 2; ++k) {
    CHECK_THAT(lines[k], Catch::StartsWith("lost: ") && Catch::Contains("was lost with its fork server, which died"));
  }
  CHECK(lines[2] == "after: 64");
}

POOL_TEST("an initializer that crashes is reported as such, never as a missing init()", "[recovery][initializer]") {
  struct Case {
    const char* name;
    procpool::Initializer init;
    const char* says;
  };
  const std::vector<Case> cases = {{"segfault", procpool::initializer<crash_in_initializer>(), "SIGSEGV"},
                                   {"abort", procpool::initializer<abort_in_initializer>(), "SIGABRT"},
                                   {"_exit(3)", procpool::initializer<exit_in_initializer>(), "exited with code 3"}};
  for (const auto& c : cases) {
    procpool::Pool pool(test::options<TestType>({.processes = 2, .initializer = c.init}));
    auto e = test::thrown<procpool::InitializerError>([&] { pool.map<sq>(iota_vec(4), 1); });
    INFO(c.name << ": " << e.what());
    CHECK_THAT(e.what(), Catch::Contains("initializer"));
    CHECK_THAT(e.what(), Catch::Contains(c.says));
    CHECK_THAT(e.what(), !Catch::Contains("procpool::init"));
    // Not retried for ever: later calls fail at once the same way.
    CHECK_THROWS_AS(pool.apply<sq>(2L), procpool::InitializerError);
  }
}

long crash(long) {
  ::raise(SIGSEGV);
  return 0;
}

/// Sets SIGCHLD's disposition for its lifetime.
class SigchldDisposition {
 public:
  explicit SigchldDisposition(void (*handler)(int), int flags = 0) {
    struct sigaction action {};
    action.sa_handler = handler;
    action.sa_flags = flags;
    REQUIRE(::sigaction(SIGCHLD, &action, &saved_) == 0);
  }
  SigchldDisposition(const SigchldDisposition&) = delete;
  SigchldDisposition& operator=(const SigchldDisposition&) = delete;
  ~SigchldDisposition() { ::sigaction(SIGCHLD, &saved_, nullptr); }

 private:
  struct sigaction saved_ {};
};

/// Reaps every child, as some daemons' SIGCHLD handlers do: it races
/// procpool's own waitpid() for each worker that ends.
void reap_every_child(int) {
  const int saved = errno;
  while (::waitpid(-1, nullptr, WNOHANG) > 0) {
  }
  errno = saved;
}

POOL_TEST("in a program that ignores SIGCHLD a crash is never reported as a clean exit", "[recovery][reaping]") {
  // The system then reaps children itself, and waitpid() has no status to give.
  SigchldDisposition ignored(SIG_IGN);
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  auto e = test::thrown<procpool::WorkerLost>([&] { pool.apply<crash>(0L); });
  INFO(e.what());
  CHECK_THAT(e.what(), !Catch::Contains("exited with code 0"));
  CHECK(e.exit_code() != 0);
  if (TestType::method == procpool::StartMethod::forkserver) {
    CHECK(e.signal() == SIGSEGV);  // the fork server reaps its workers itself
  } else {
    CHECK_THAT(e.what(), Catch::Contains("ignores SIGCHLD"));
  }
  CHECK(pool.apply<sq>(3L) == 9);  // and the pool goes on
}

POOL_TEST("with a SIGCHLD handler that reaps, a crash is never reported as a clean exit", "[recovery][reaping]") {
  SigchldDisposition handler(reap_every_child, SA_RESTART);
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  // The handler wins the race for some of the crashes, procpool for others.
  for (int round = 0; round < 6; ++round) {
    auto e = test::thrown<procpool::WorkerLost>([&] { pool.apply<crash>(0L); });
    INFO(e.what());
    CHECK_THAT(e.what(), !Catch::Contains("exited with code"));
    CHECK(e.exit_code() != 0);
    if (e.signal() != SIGSEGV) CHECK_THAT(e.what(), Catch::Contains("how is unknown"));
  }
  CHECK(pool.apply<sq>(3L) == 9);
}

POOL_TEST("a worker whose result stream stops mid-frame is a ProtocolError in bounded time, and is replaced",
          "[recovery][protocol]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  const auto started = std::chrono::steady_clock::now();
  auto stalled = test::thrown<procpool::ProtocolError>([&] { pool.apply<false_header>(1L); });
  CHECK(std::chrono::steady_clock::now() - started < 30s);
  CHECK_THAT(stalled.what(), Catch::Contains("middle of a message"));
  CHECK(pool.map<sq>(iota_vec(20), 1) == squares(20));
  auto partial = test::thrown<procpool::ProtocolError>([&] { pool.apply<partial_header>(1L); });
  CHECK(std::chrono::steady_clock::now() - started < 60s);
  CHECK(pool.map<sq>(iota_vec(20), 1) == squares(20));
}

}  // namespace recovery_test

// What distinguishes the start methods: threads in the parent, and the
// procpool::init line that the exec-based methods depend on.
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
#include <ranges>
#include <set>
#include <string>
#include <thread>

#include "common.hpp"

namespace {

std::mutex held_elsewhere;

long increment(long x) { return x + 1; }

/// In a worker: the command line (first argument) of the fork server of a pool made there.
std::string nested_fork_server_line(int) {
  procpool::Pool inner({.processes = 1, .start_method = procpool::StartMethod::forkserver});
  if (inner.apply<increment>(1L) != 2) return "no result";
  for (int pid : test::child_pids()) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline");
    std::string line;
    std::getline(in, line, '\0');
    if (line.find("fork server") != std::string::npos) return line;
  }
  return "no fork server";
}

long lock_and_return(long x) {
  // Under fork this mutex would be copied locked and never released.
  std::lock_guard lock(held_elsewhere);
  return x;
}

/// Holds `held_elsewhere` on another thread for its lifetime.
class MutexHolder {
 public:
  MutexHolder() {
    thread_ = std::thread([this] {
      std::lock_guard held(held_elsewhere);
      {
        std::lock_guard lock(m_);
        holding_ = true;
      }
      cv_.notify_all();
      std::unique_lock lock(m_);
      cv_.wait(lock, [this] { return done_; });
    });
    std::unique_lock lock(m_);
    cv_.wait(lock, [this] { return holding_; });
  }
  ~MutexHolder() {
    {
      std::lock_guard lock(m_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool holding_ = false, done_ = false;
  std::thread thread_;
};

}  // namespace

TEMPLATE_TEST_CASE("exec-based start methods work while another thread holds a lock", "[start]", test::PosixSpawn,
                   test::Forkserver) {
  MutexHolder holder;
  // maxtasksperchild=1 starts a new worker for every task, all while the lock is held.
  procpool::Pool pool(test::options<TestType>({.maxtasksperchild = 1}));
  std::vector<long> in{1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  auto results = pool.map<lock_and_return>(in, 1);
  CHECK(results == in);
  std::set<int> pids;
  for (int pid : pool.map([](int) { return static_cast<int>(::getpid()); }, std::vector<int>(6, 0), 1)) {
    pids.insert(pid);
  }
  CHECK(pids.size() == 6);
}

TEST_CASE("fork in a threaded program is an error when asked", "[start]") {
  MutexHolder holder;
  try {
    procpool::Pool pool({.processes = 2, .start_method = procpool::StartMethod::fork, .error_on_threaded_fork = true});
    FAIL("the pool was created");
  } catch (const procpool::Error& e) {
    std::string what = e.what();
    CHECK_THAT(what, Catch::Contains("StartMethod::fork"));
    CHECK_THAT(what, Catch::Contains("forkserver"));
  }
}

TEST_CASE("fork in a threaded program warns once on stderr", "[start]") {
  auto run = test::run_program({PROCPOOL_HELPER, "threaded-fork"});
  INFO(run.output);
  REQUIRE(WIFEXITED(run.status));
  CHECK(WEXITSTATUS(run.status) == 0);
  CHECK_THAT(run.output, Catch::Contains("ok"));
  std::size_t warnings = 0;
  for (std::size_t at = run.output.find("warning"); at != std::string::npos; at = run.output.find("warning", at + 1)) {
    ++warnings;
  }
  CHECK(warnings == 1);
  CHECK_THAT(run.output, Catch::Contains("StartMethod::forkserver"));
}

TEST_CASE("fork in a threaded program: the pool's own locks are never copied locked", "[start]") {
  // Another thread keeps taking the lock of the table workers look their
  // code up in (naming a function takes it); a worker forked while it was
  // held used to wait for it for ever. The task timeout turns such a worker
  // into an error instead of a hang.
  struct Naming {
    std::atomic<bool> stop{false};
    std::thread thread{[this] {
      while (!stop) procpool::Initializer named([] {});
    }};
    ~Naming() {
      stop = true;
      thread.join();
    }
  } naming;
  procpool::Pool pool({.processes = 2,
                       .start_method = procpool::StartMethod::fork,
                       .maxtasksperchild = 1,
                       .task_timeout = std::chrono::seconds(2)});
  long expected = 0;
  for (long got : pool.imap<lock_and_return>(tv::iota(0L, 300L), 1)) CHECK(got == expected++);
  CHECK(expected == 300);
}

TEST_CASE("a pool's first setting can be given alone, as Pool({2})", "[start]") {
  procpool::Pool pool({2});  // Options::processes, its first field
  CHECK(pool.processes() == 2);
}

// ThreadSanitizer runs a thread of its own once the program has started one:
// under it, no process is single-threaded, and fork pools rightly warn.
#if !defined(__SANITIZE_THREAD__)
TEST_CASE("fork in a single-threaded program does not warn", "[start]") {
  // This test process runs only the Catch2 thread here.
  procpool::Pool pool({.processes = 2, .start_method = procpool::StartMethod::fork, .error_on_threaded_fork = true});
  CHECK(pool.apply([](int x) { return x + 1; }, 1) == 2);
}

TEST_CASE("a fork pool made before a thread starts has forked its workers when its constructor returns", "[start]") {
  // As with Python's Pool(): the thread started right after the pool is in
  // none of its forks. The workers used to be forked later, by the I/O
  // thread, and the check saw this test's thread in about 1 run in 5.
  for (int round = 0; round < 20; ++round) {
    procpool::Pool pool({.processes = 2, .start_method = procpool::StartMethod::fork, .error_on_threaded_fork = true});
    std::thread side([] { std::this_thread::sleep_for(std::chrono::milliseconds(20)); });
    long got = 0;
    CHECK_NOTHROW(got = pool.apply([](long x) { return x * 3; }, 3L));
    CHECK(got == 9);
    side.join();
  }
}
#endif  // !defined(__SANITIZE_THREAD__)

TEMPLATE_TEST_CASE("a program that forgets procpool::init gets a clear error, not a process storm", "[start]",
                   test::PosixSpawn, test::Forkserver) {
  test::TempDir dir;
  std::string log = dir / "runs";
  std::string method(procpool::to_string(TestType::method));
  auto run = test::run_program({PROCPOOL_FORGETS_INIT, method, log});
  INFO(run.output);
  CHECK_THAT(run.output, !Catch::Contains("[killed: time limit]"));
  REQUIRE(WIFEXITED(run.status));
  CHECK(WEXITSTATUS(run.status) == 3);
  CHECK_THAT(run.output, Catch::Contains("procpool::init(argc, argv)"));
  CHECK_THAT(run.output, Catch::Contains("first line of main"));
  // The program itself, and at most one run per worker (or the fork server).
  auto runs = test::read_lines(log);
  CHECK(runs.size() >= 2);
  CHECK(runs.size() <= 3);
  // None of them is left running.
  for (const auto& pid : runs) {
    CHECK((::kill(std::stoi(pid), 0) == -1 && errno == ESRCH));
  }
}

POOL_TEST("a Pool at namespace scope, made before main(), works", "[start]") {
  // Its workers make it again before their main() reaches procpool::init:
  // it stays dormant there. A fork pool made then waits for its first call
  // to fork, when the program's static initialization is complete.
  auto run =
      test::run_program({"/usr/bin/env", "PROCPOOL_TEST_METHOD=" + std::string(procpool::to_string(TestType::method)),
                         PROCPOOL_GLOBAL_POOL});
  INFO(run.output);
  REQUIRE(WIFEXITED(run.status));
  CHECK(WEXITSTATUS(run.status) == 0);
  CHECK(run.output == "squares: 0 1 4 9\ntask: refused\njoined\n");
}

TEST_CASE("fork pools in a program without procpool::init fork at their first call, and say so once", "[start]") {
  // Made before main(), in main() and owned by a global, and never used: all
  // work, and all are destroyed at exit without touching freed memory.
  auto run = test::run_program({PROCPOOL_NO_INIT});
  INFO(run.output);
  REQUIRE(WIFEXITED(run.status));
  CHECK(WEXITSTATUS(run.status) == 0);
  CHECK_THAT(run.output, Catch::Contains("squares: 0 1 4 9\ncubes: 0 1 8 27\n"));
  const std::string warning = "forks its workers at its first call";
  const auto first = run.output.find(warning);
  CHECK(first != std::string::npos);
  CHECK(run.output.find(warning, first + 1) == std::string::npos);
  CHECK_THAT(run.output, Catch::Contains("Call procpool::init(argc, argv) first in main()"));
  CHECK_THAT(run.output, !Catch::Contains("ERROR"));  // a sanitizer's report
}

POOL_TEST("a program started through the dynamic loader starts its workers", "[start][loader]") {
  // `ld.so [options] ./prog` (as bundles start programs): /proc/self/exe is
  // the loader, which re-ran without the program ("unrecognized option
  // '--procpool-worker'"), and the error said to add procpool::init.
  const char* loader = procpool::detail::program_interpreter();  // /lib64/ld-linux-x86-64.so.2 on x86-64
  REQUIRE(loader != nullptr);
  auto run = test::run_program({loader, "--inhibit-cache", PROCPOOL_HELPER, "fewfds",
                                std::string(procpool::to_string(TestType::method)), "64"},
                               60000);
  INFO(run.output);
  CHECK(WIFEXITED(run.status));
  CHECK(run.output == "squares ok\nbig ok\n");
}

POOL_TEST("without /proc, fork works and the other start methods say what is missing", "[start][noproc]") {
  // A chroot or container that does not mount /proc: posix_spawn and the
  // fork server start the program from /proc/self/exe.
  const std::string method(procpool::to_string(TestType::method));
  auto run = test::run_program({PROCPOOL_HELPER, "noproc", method}, 60000);
  INFO(run.output);
  REQUIRE(run.output.find("cannot") == std::string::npos);  // the helper could hide /proc
  if (TestType::method == procpool::StartMethod::fork) {
    CHECK(run.output == "results 1 4 9\n");
  } else {
    CHECK_THAT(run.output, Catch::StartsWith("error: procpool: map input #0 was not run"));
    CHECK_THAT(run.output, Catch::Contains("/proc is not mounted") && Catch::Contains("use StartMethod::fork"));
  }
}

POOL_TEST("a pool made in a worker names its fork server after the program", "[start]") {
  // A re-executed worker's argv[0] holds its title ("prog: procpool worker
  // 0"): a pool made there named its fork server "prog: procpool worker 0:
  // procpool fork server".
  const std::string program = std::filesystem::path(program_invocation_name).filename().string();
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  CHECK(pool.apply<nested_fork_server_line>(0) == program + ": procpool fork server");
}

POOL_TEST("workers and the fork server show the program's name and their role in ps and top", "[start]") {
  auto read_proc = [](int pid, const char* what) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/" + what);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (!text.empty() && text.back() == '\n') text.pop_back();
    return text;
  };
  const std::string mine = read_proc(static_cast<int>(::getpid()), "comm");
  const std::string program = std::filesystem::path(program_invocation_name).filename().string();
  procpool::Pool pool(test::options<TestType>());
  // The workers that answered (under forkserver, children of the fork server), and the fork server.
  std::set<int> pids;
  for (int pid : pool.map([](int) { return static_cast<int>(::getpid()); }, std::vector<int>(4, 0), 1)) {
    pids.insert(pid);
  }
  for (int pid : test::child_pids()) pids.insert(pid);
  std::size_t workers = 0, servers = 0;
  for (int pid : pids) {
    const std::string comm = read_proc(pid, "comm");
    const std::string args = read_proc(pid, "cmdline");
    const std::string first_arg = args.substr(0, args.find('\0'));
    INFO("child " << pid << ": comm '" << comm << "', command line '" << first_arg << "'");
    const auto colon = comm.find(':');
    REQUIRE(colon != std::string::npos);
    CHECK(mine.starts_with(comm.substr(0, colon)));  // the program's name, cut to fit
    const std::string role = comm.substr(colon + 1);
    if (role == "server") {
      ++servers;
      CHECK(first_arg == program + ": procpool fork server");
    } else {
      ++workers;
      REQUIRE(role.size() == 2);
      CHECK(role[0] == 'w');
      // A forked worker's command line is the program's own, which its code may still read.
      if (TestType::method != procpool::StartMethod::fork) {
        CHECK(first_arg == program + ": procpool worker " + role.substr(1));
      }
    }
  }
  CHECK(workers >= 1);
  CHECK(servers == (TestType::method == procpool::StartMethod::forkserver ? 1U : 0U));
}

// What distinguishes the start methods: threads in the parent, and the
// procpool::init line that the exec-based methods depend on.
#include <atomic>
#include <condition_variable>
#include <csignal>
#include <mutex>
#include <ranges>
#include <set>
#include <thread>

#include "common.hpp"

namespace {

std::mutex held_elsewhere;

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
  for (long got : pool.imap<lock_and_return>(std::views::iota(0L, 300L), 1)) CHECK(got == expected++);
  CHECK(expected == 300);
}

TEST_CASE("fork in a single-threaded program does not warn", "[start]") {
  // This test process runs only the Catch2 thread here.
  procpool::Pool pool({.processes = 2, .start_method = procpool::StartMethod::fork, .error_on_threaded_fork = true});
  CHECK(pool.apply([](int x) { return x + 1; }, 1) == 2);
}

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

POOL_TEST("workers and the fork server carry the program's name in ps and top", "[start]") {
  auto comm_of = [](int pid) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/comm");
    std::string name;
    std::getline(in, name);
    return name;
  };
  const std::string mine = comm_of(static_cast<int>(::getpid()));
  procpool::Pool pool(test::options<TestType>());
  // Every worker is up once it has answered.
  auto pids = pool.map([](int) { return static_cast<int>(::getpid()); }, std::vector<int>(4, 0), 1);
  REQUIRE_FALSE(test::child_pids().empty());
  for (int pid : test::child_pids()) {  // the workers, and the fork server
    INFO("child " << pid);
    CHECK(comm_of(pid) == mine);
  }
  for (int pid : pids) CHECK(comm_of(pid) == mine);
}

// Shared helpers for the test suite: every semantic test runs under each start method.
#pragma once

#include <catch2/catch.hpp>
#include <procpool/procpool.hpp>

#include "views.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace test {

struct Fork {
  static constexpr procpool::StartMethod method = procpool::StartMethod::fork;
};
struct PosixSpawn {
  static constexpr procpool::StartMethod method = procpool::StartMethod::posix_spawn;
};
struct Forkserver {
  static constexpr procpool::StartMethod method = procpool::StartMethod::forkserver;
};

/// A pool of `processes` workers with the test's start method.
template <class Method>
procpool::Options options(procpool::Options o = {}) {
  o.start_method = Method::method;
  if (o.processes == 0) o.processes = 2;
  return o;
}

/// The numbers from, from + 1, ..., n of them: the input most tests map over.
inline std::vector<long> iota_vec(long n, long from = 0) {
  std::vector<long> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), from);
  return v;
}

/// 0, 1, 4, ...: iota_vec(n) squared.
inline std::vector<long> squares(long n) {
  std::vector<long> v = iota_vec(n);
  for (long& x : v) x *= x;
  return v;
}

/// Open file descriptors of this process.
inline std::size_t open_fd_count() {
  std::size_t count = 0;
  if (DIR* dir = ::opendir("/proc/self/fd")) {
    while (::readdir(dir) != nullptr) ++count;
    ::closedir(dir);
  }
  return count - 3;  // ".", ".." and the directory's own fd
}

/// Live (or zombie) children of this process, whichever of its threads started them.
inline std::vector<int> child_pids() {
  std::vector<int> pids;
  if (DIR* tasks = ::opendir("/proc/self/task")) {
    while (dirent* entry = ::readdir(tasks)) {
      if (entry->d_name[0] == '.') continue;
      std::string path = std::string("/proc/self/task/") + entry->d_name + "/children";
      if (FILE* f = std::fopen(path.c_str(), "r")) {
        int pid;
        while (std::fscanf(f, "%d", &pid) == 1) pids.push_back(pid);
        std::fclose(f);
      }
    }
    ::closedir(tasks);
  }
  return pids;
}

/// A fresh empty directory, removed with its contents when this goes out of
/// scope. Tasks and initializers get its path as an argument and leave files
/// there: a side effect the test can see under every start method.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "procpool-test-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed for " + pattern);
    path_ = pattern;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }

  const std::string& path() const { return path_; }
  /// `name` inside the directory.
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  /// Names of the files in it, sorted.
  std::vector<std::string> files() const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(path_)) names.push_back(entry.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  std::string path_;
};

/// Appends one line to a file (creating it): how tasks leave a trace.
inline void append_line(const std::string& file, const std::string& line) {
  std::ofstream(file, std::ios::app) << line << '\n';
}

/// Crashes (SIGKILL) the first time it sees `x`, then returns it: a marker
/// file in `dir` remembers. A task for testing retries.
inline long crash_once(std::string dir, long x) {
  std::string marker = dir + "/" + std::to_string(x);
  if (::access(marker.c_str(), F_OK) != 0) {
    append_line(marker, "crashed once");
    ::raise(SIGKILL);
  }
  return x;
}

/// The lines of a file.
inline std::vector<std::string> read_lines(const std::string& file) {
  std::vector<std::string> lines;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

/// Runs `f`, which must throw an `E`; returns the exception for closer checks.
template <class E, class F>
E thrown(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e;
  }
  FAIL("the call returned instead of throwing");
  throw std::logic_error("unreachable");
}

/// 0, 1, 2, ... without end, counting in `pulled` how many were read: how
/// far a lazy call (imap) read its input.
inline auto counted_iota(long& pulled) {
  return tv::iota(0L) | tv::transform([&pulled](long x) {
           ++pulled;
           return x;
         });
}

/// 0, 1, ..., end - 1, counting in `pulled` how many were read.
inline auto counted_iota(long& pulled, long end) {
  return tv::iota(0L, end) | tv::transform([&pulled](long x) {
           ++pulled;
           return x;
         });
}

/// The start method of the POOL_TEST running now, as `TestType::method`.
struct Current {
  static inline procpool::StartMethod method = procpool::StartMethod::fork;
};

}  // namespace test

/// A test case run once per start method ("name - test::Fork", ...). Its
/// body is compiled once, not once per start method: in it, `TestType` is
/// test::Current, whose `method` is set before each run.
#define POOL_TEST(name, tags) PROCPOOL_POOL_TEST_(name, tags, PROCPOOL_TEST_CAT_(pool_test_, __COUNTER__))
#define PROCPOOL_TEST_CAT_(a, b) PROCPOOL_TEST_CAT2_(a, b)
#define PROCPOOL_TEST_CAT2_(a, b) a##b
#define PROCPOOL_POOL_TEST_(name, tags, id)           \
  namespace {                                         \
  struct id {                                         \
    using TestType = test::Current;                   \
    static void run();                                \
  };                                                  \
  }                                                   \
  TEST_CASE(name " - test::Fork", tags) {             \
    test::Current::method = test::Fork::method;       \
    id::run();                                        \
  }                                                   \
  TEST_CASE(name " - test::PosixSpawn", tags) {       \
    test::Current::method = test::PosixSpawn::method; \
    id::run();                                        \
  }                                                   \
  TEST_CASE(name " - test::Forkserver", tags) {       \
    test::Current::method = test::Forkserver::method; \
    id::run();                                        \
  }                                                   \
  void id::run()

namespace test {

struct ProgramRun {
  int status = -1;     // waitpid status
  std::string output;  // stdout and stderr together
};

/// Runs a program with a time limit (SIGKILL after it), collecting its output.
/// `closed`: fds the program starts without (of 0, 1 and 2; its output then
/// comes from whichever of 1 and 2 stays open).
inline ProgramRun run_program(std::vector<std::string> args, int timeout_ms = 30000, std::vector<int> closed = {}) {
  int out[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(out[1], 1);
    ::dup2(out[1], 2);
    for (int fd : closed) ::close(fd);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(out[1]);
  ProgramRun run;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  char buffer[4096];
  for (;;) {
    auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
    pollfd p{out[0], POLLIN, 0};
    if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) {
      ::kill(pid, SIGKILL);
      run.output += "\n[killed: time limit]";
      break;
    }
    ssize_t n = ::read(out[0], buffer, sizeof(buffer));
    if (n <= 0) break;
    run.output.append(buffer, static_cast<std::size_t>(n));
  }
  ::close(out[0]);
  ::waitpid(pid, &run.status, 0);
  return run;
}

/// Whether a process is still running: it exists and is not a zombie. (A
/// zombie of ours shows in test::child_pids(); one of a fork server's is the
/// server's to reap.)
inline bool running(int pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  auto close_paren = line.rfind(')');  // the command name may hold spaces and parentheses
  if (close_paren == std::string::npos || close_paren + 2 >= line.size()) return false;
  char state = line[close_paren + 2];
  return state != 'Z' && state != 'X';
}

/// Waits up to `timeout` for every pid to stop running; true if they all did.
inline bool all_stop_running(const std::vector<int>& pids, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (std::none_of(pids.begin(), pids.end(), running)) return true;
    if (std::chrono::steady_clock::now() > deadline) return false;
    ::usleep(5000);
  }
}

}  // namespace test

// A program started with its stdin, stdout or stderr closed (a daemon, a
// service started with `prog <&- >&-`): procpool's own fds never take the
// numbers 0, 1 and 2, so what a task prints never lands in a pipe or a
// shared buffer of the pool's, and every result is exact.
#include <fmt/format.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "common.hpp"

POOL_TEST("results are exact when the program starts with stdin, stdout or stderr closed", "[stdio]") {
  const std::string method(procpool::to_string(TestType::method));
  const std::vector<std::vector<int>> closed_sets = {{0}, {1}, {2}, {0, 1}, {0, 1, 2}};
  for (const auto& closed : closed_sets) {
    for (const std::string mode : {"inherit", "lines", "prefixed", "callback"}) {
      test::TempDir dir;
      auto run = test::run_program({PROCPOOL_HELPER, "closed-stdio", method, mode, dir / "verdict"}, 60000, closed);
      std::ifstream in(dir / "verdict");
      std::stringstream verdict;
      verdict << in.rdbuf();
      INFO(fmt::format("fds {} closed, worker_output {}: wait status {}\n{}", fmt::join(closed, ","), mode, run.status,
                       run.output));
      CHECK(verdict.str() == "exact");
      CHECK(WIFEXITED(run.status));
      CHECK(WEXITSTATUS(run.status) == 0);
    }
  }
}

POOL_TEST("results are exact when the program closes its stdio while the pool runs", "[stdio]") {
  // Workers replaced after each task: their new pipes are made while 0, 1 and 2 are free.
  const std::string method(procpool::to_string(TestType::method));
  for (const std::string mode : {"inherit", "lines", "callback"}) {
    test::TempDir dir;
    auto run = test::run_program({PROCPOOL_HELPER, "closed-stdio", method, mode, dir / "verdict", "late"}, 60000);
    std::ifstream in(dir / "verdict");
    std::stringstream verdict;
    verdict << in.rdbuf();
    INFO(fmt::format("worker_output {}: wait status {}\n{}", mode, run.status, run.output));
    CHECK(verdict.str() == "exact");
    CHECK(WIFEXITED(run.status));
    CHECK(WEXITSTATUS(run.status) == 0);
  }
}

namespace stdio_test {

/// The fds of this process above 2 that a program it exec'd would inherit.
std::vector<int> inheritable_fds(int) {
  std::vector<int> fds;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return {-1};
  while (dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    const int fd = std::atoi(entry->d_name);
    if (fd <= 2 || fd == ::dirfd(dir)) continue;
    const int flags = ::fcntl(fd, F_GETFD);
    if (flags >= 0 && (flags & FD_CLOEXEC) == 0) fds.push_back(fd);
  }
  ::closedir(dir);
  return fds;
}

}  // namespace stdio_test

POOL_TEST("a program a task runs inherits none of the pool's fds", "[stdio][fds]") {
  // What the program itself would pass on (from its own parent) a worker passes on too; nothing more.
  const std::vector<int> own = stdio_test::inheritable_fds(0);
  for (const auto output : {procpool::WorkerOutput::inherit, procpool::WorkerOutput::lines}) {
    procpool::Pool pool(test::options<TestType>({.worker_output = output}));
    for (auto fds : pool.map<stdio_test::inheritable_fds>(std::vector<int>(4, 0), 1)) {
      std::erase_if(fds, [&](int fd) { return std::find(own.begin(), own.end(), fd) != own.end(); });
      INFO("fds of the pool's a task's exec would inherit: " << fmt::format("{}", fmt::join(fds, ", ")));
      CHECK(fds.empty());
    }
  }
}

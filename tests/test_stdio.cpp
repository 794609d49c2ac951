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

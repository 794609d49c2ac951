// No zombies, in the settings containers have: the program as PID 1 of its
// namespace, or a subreaper, inherits every orphan of its descendants. After
// join() and after a pool is destroyed, none of its processes (workers, fork
// server, the fork server's workers) is left, dead or alive.
#include <fmt/format.h>

#include <string>

#include "common.hpp"

namespace {

/// The helper's count line, checked.
void check_no_children(const test::ProgramRun& run) {
  INFO(run.output);
  CHECK(WIFEXITED(run.status));
  CHECK(WEXITSTATUS(run.status) == 0);
  CHECK_THAT(run.output, Catch::Contains("children after join 0, after destruction 0"));
}

}  // namespace

POOL_TEST("no zombie is left after join() or destruction in a subreaper", "[reaping]") {
  auto run = test::run_program({PROCPOOL_HELPER, "reaper", std::string(procpool::to_string(TestType::method)), "150",
                                "subreaper"},
                               90000);
  check_no_children(run);
}

POOL_TEST("no zombie is left after join() or destruction in a program that is PID 1", "[reaping]") {
  // A PID namespace of its own makes the helper PID 1 (as in a container):
  // unshare as root, or with a user namespace where those are allowed.
  const std::string method(procpool::to_string(TestType::method));
  std::vector<std::string> args = {"/usr/bin/unshare", "--pid", "--fork", "--mount-proc"};
  if (::geteuid() != 0) args.insert(args.begin() + 1, "--map-root-user");
  auto probe = test::run_program([&] {
    auto a = args;
    a.push_back("/bin/true");
    return a;
  }());
  INFO("unshare --pid is needed for this test (root, or user namespaces): " << probe.output);
  REQUIRE(probe.status == 0);
  for (auto s : {std::string(PROCPOOL_HELPER), std::string("reaper"), method, std::string("150")}) args.push_back(s);
  check_no_children(test::run_program(args, 90000));
}

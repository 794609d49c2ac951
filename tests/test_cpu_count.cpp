// procpool::cpu_count(): the affinity mask capped by the cgroup CPU quota.
// The cgroup parsing runs on fake cgroupfs trees built in a temporary
// directory, so each layout is tested whatever this machine's cgroups are.
#include <sched.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>

#include "common.hpp"

namespace {

/// Writes `text` to `dir/name`, creating `dir` and its parents.
void write_file(const std::filesystem::path& dir, const std::string& name, const std::string& text) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir / name) << text;
}

/// What cgroup_cpu_limit() finds, rounded up as cpu_count() rounds it; 0 for no limit.
std::size_t limit_in(const std::string& proc_self_cgroup, const std::filesystem::path& root) {
  std::optional<double> limit = procpool::detail::cgroup_cpu_limit(proc_self_cgroup, root);
  return limit ? procpool::detail::limit_cpu_count(1'000'000, limit) : 0;
}

}  // namespace

TEST_CASE("cpu.max parsing: quota / period, none for max or garbage", "[cpu_count]") {
  using procpool::detail::parse_cpu_max;
  CHECK_FALSE(parse_cpu_max("max 100000\n").has_value());
  CHECK(parse_cpu_max("200000 100000\n") == 2.0);
  CHECK(parse_cpu_max("150000 100000") == 1.5);
  CHECK(parse_cpu_max("50000 100000") == 0.5);
  for (const char* garbage : {"", "\n", "max", "100000", "abc 100000", "100000 abc", "12x 100000", "0 100000",
                              "-1 100000", "100000 0", "100000 -5", "1e5 100000"}) {
    INFO("cpu.max: \"" << garbage << '"');
    CHECK_FALSE(parse_cpu_max(garbage).has_value());
  }
}

TEST_CASE("cfs quota parsing: quota / period, none for -1 or garbage", "[cpu_count]") {
  using procpool::detail::parse_cfs_quota;
  CHECK(parse_cfs_quota("300000\n", "100000\n") == 3.0);
  CHECK(parse_cfs_quota("25000", "100000") == 0.25);
  CHECK_FALSE(parse_cfs_quota("-1\n", "100000\n").has_value());
  CHECK_FALSE(parse_cfs_quota("", "100000").has_value());
  CHECK_FALSE(parse_cfs_quota("100000", "").has_value());
  CHECK_FALSE(parse_cfs_quota("lots", "100000").has_value());
}

TEST_CASE("a cgroup quota rounds up, caps the affinity count, and never gives 0", "[cpu_count]") {
  using procpool::detail::limit_cpu_count;
  using procpool::detail::parse_cpu_max;
  CHECK(limit_cpu_count(8, parse_cpu_max("150000 100000")) == 2);
  CHECK(limit_cpu_count(8, parse_cpu_max("50000 100000")) == 1);
  CHECK(limit_cpu_count(8, parse_cpu_max("200000 100000")) == 2);
  CHECK(limit_cpu_count(8, parse_cpu_max("max 100000")) == 8);
  CHECK(limit_cpu_count(2, parse_cpu_max("400000 100000")) == 2);  // a quota above the mask does not add CPUs
  CHECK(limit_cpu_count(8, 0.001) == 1);
  CHECK(limit_cpu_count(0, std::nullopt) == 1);
}

TEST_CASE("cgroup v2: the tightest cpu.max of the cgroup and its ancestors wins", "[cpu_count]") {
  test::TempDir tmp;
  const std::filesystem::path root = tmp.path();
  const std::string self = "0::/outer/middle/inner\n";

  SECTION("no cpu.max anywhere: no limit") {
    std::filesystem::create_directories(root / "outer/middle/inner");
    CHECK(limit_in(self, root) == 0);
  }
  SECTION("every level max: no limit") {
    write_file(root / "outer", "cpu.max", "max 100000\n");
    write_file(root / "outer/middle/inner", "cpu.max", "max 100000\n");
    CHECK(limit_in(self, root) == 0);
  }
  SECTION("a limit on the process's own cgroup") {
    write_file(root / "outer/middle/inner", "cpu.max", "300000 100000\n");
    CHECK(limit_in(self, root) == 3);
  }
  SECTION("an ancestor's tighter limit beats the cgroup's own") {
    write_file(root / "outer", "cpu.max", "150000 100000\n");
    write_file(root / "outer/middle", "cpu.max", "max 100000\n");
    write_file(root / "outer/middle/inner", "cpu.max", "400000 100000\n");
    CHECK(limit_in(self, root) == 2);
  }
  SECTION("the cgroup's tighter limit beats its ancestors'") {
    write_file(root / "outer", "cpu.max", "800000 100000\n");
    write_file(root / "outer/middle/inner", "cpu.max", "50000 100000\n");
    CHECK(limit_in(self, root) == 1);
  }
  SECTION("a limit on the root itself, as a container with its own cgroup namespace sees it") {
    write_file(root, "cpu.max", "200000 100000\n");
    CHECK(limit_in("0::/\n", root) == 2);
  }
  SECTION("a path missing under the mount (cgroupns=host container) still reaches the mount's own limit") {
    write_file(root, "cpu.max", "200000 100000\n");
    CHECK(limit_in("0::/docker/0123abcd\n", root) == 2);
  }
  SECTION("siblings' limits do not apply") {
    write_file(root / "outer/middle/other", "cpu.max", "100000 100000\n");
    write_file(root / "outer/middle/inner", "cpu.max", "300000 100000\n");
    CHECK(limit_in(self, root) == 3);
  }
  SECTION("a path outside the cgroup namespace is not looked up under the mount") {
    write_file(root, "cpu.max", "100000 100000\n");
    CHECK(limit_in("0::/../../elsewhere\n", root) == 0);
  }
  SECTION("garbage in cpu.max is no limit") {
    write_file(root / "outer/middle/inner", "cpu.max", "lots\n");
    CHECK(limit_in(self, root) == 0);
  }
}

TEST_CASE("cgroup v1: cfs quota / period of the cpu controller's hierarchy", "[cpu_count]") {
  test::TempDir tmp;
  const std::filesystem::path root = tmp.path();
  const std::string self =
      "12:pids:/user.slice\n"
      "4:cpu,cpuacct:/docker/abc\n"
      "3:cpuset:/docker/abc\n"
      "1:name=systemd:/docker/abc\n"
      "0::/docker/abc\n";

  SECTION("a quota on the cgroup, in a hierarchy named after its controllers") {
    write_file(root / "cpu,cpuacct/docker/abc", "cpu.cfs_quota_us", "250000\n");
    write_file(root / "cpu,cpuacct/docker/abc", "cpu.cfs_period_us", "100000\n");
    write_file(root / "cpu,cpuacct", "cpu.cfs_quota_us", "-1\n");
    write_file(root / "cpu,cpuacct", "cpu.cfs_period_us", "100000\n");
    CHECK(limit_in(self, root) == 3);
  }
  SECTION("an ancestor's tighter quota wins") {
    write_file(root / "cpu,cpuacct/docker/abc", "cpu.cfs_quota_us", "-1\n");
    write_file(root / "cpu,cpuacct/docker/abc", "cpu.cfs_period_us", "100000\n");
    write_file(root / "cpu,cpuacct/docker", "cpu.cfs_quota_us", "100000\n");
    write_file(root / "cpu,cpuacct/docker", "cpu.cfs_period_us", "100000\n");
    CHECK(limit_in(self, root) == 1);
  }
  SECTION("the cpu controller mounted alone at cpu/") {
    write_file(root / "cpu/docker/abc", "cpu.cfs_quota_us", "150000\n");
    write_file(root / "cpu/docker/abc", "cpu.cfs_period_us", "100000\n");
    CHECK(limit_in("1:cpu:/docker/abc\n2:cpuacct:/docker/abc\n", root) == 2);
  }
  SECTION("quota -1 everywhere: no limit") {
    write_file(root / "cpu,cpuacct/docker/abc", "cpu.cfs_quota_us", "-1\n");
    write_file(root / "cpu,cpuacct/docker/abc", "cpu.cfs_period_us", "100000\n");
    CHECK(limit_in(self, root) == 0);
  }
  SECTION("other controllers' files and cpuacct alone are not read as the cpu controller") {
    write_file(root / "cpuset/docker/abc", "cpu.cfs_quota_us", "100000\n");
    write_file(root / "cpuset/docker/abc", "cpu.cfs_period_us", "100000\n");
    CHECK(limit_in("3:cpuset:/docker/abc\n2:cpuacct:/docker/abc\n", root) == 0);
  }
  SECTION("hybrid: a v1 quota and a v2 cpu.max, the tighter wins") {
    write_file(root / "cpu,cpuacct/docker/abc", "cpu.cfs_quota_us", "400000\n");
    write_file(root / "cpu,cpuacct/docker/abc", "cpu.cfs_period_us", "100000\n");
    write_file(root / "docker/abc", "cpu.max", "200000 100000\n");
    CHECK(limit_in(self, root) == 2);
  }
}

TEST_CASE("cpu_count() is this process's affinity count capped by its cgroups, and at least 1", "[cpu_count]") {
  cpu_set_t set;
  CPU_ZERO(&set);
  REQUIRE(::sched_getaffinity(0, sizeof(set), &set) == 0);
  const auto affinity = static_cast<std::size_t>(CPU_COUNT(&set));

  const std::size_t cpus = procpool::cpu_count();
  CHECK(cpus >= 1);
  CHECK(cpus <= affinity);

  // The same answer computed from the parts: this machine's real cgroup files.
  std::ifstream in("/proc/self/cgroup");
  const std::string self{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  CHECK(cpus == procpool::detail::limit_cpu_count(affinity, procpool::detail::cgroup_cpu_limit(self)));
}

TEST_CASE("cpu_count() follows a narrowed affinity mask", "[cpu_count]") {
  cpu_set_t original;
  CPU_ZERO(&original);
  REQUIRE(::sched_getaffinity(0, sizeof(original), &original) == 0);
  int first = 0;
  while (!CPU_ISSET(first, &original)) ++first;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  // Only this thread's mask changes (sched_setaffinity(0) is per thread), and it is restored before any check fails.
  REQUIRE(::sched_setaffinity(0, sizeof(one), &one) == 0);
  const std::size_t cpus = procpool::cpu_count();
  REQUIRE(::sched_setaffinity(0, sizeof(original), &original) == 0);
  CHECK(cpus == 1);
}

/// @file
/// How many CPUs this process may use: procpool::cpu_count().
#pragma once

#include <cstddef>

#include "detail/config.hpp"

namespace procpool {

/**
 * The number of CPUs this process may really use, at least 1: the smaller of its `sched_getaffinity` mask and its
 * cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, over its cgroup and every ancestor),
 * rounded up. In a container limited to 2 CPUs on a 64-core host this is 2, where Python's `os.cpu_count()` says 64
 * and its `Pool()` starts 64 workers. This is the default `Options::processes`.
 *
 * @code
 * std::printf("%zu workers\n", procpool::cpu_count());
 * @endcode
 *
 * @return the CPU count; never 0.
 *
 * This function is thread-safe.
 */
PROCPOOL_ENGINE_INLINE std::size_t cpu_count() noexcept;

}  // namespace procpool

#if PROCPOOL_DEFINE_ENGINE
#include <fcntl.h>
#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace procpool {

namespace detail {

/// The whole of a small file (cgroup and /proc pseudo-files), or nullopt if it cannot be read.
inline std::optional<std::string> read_small_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  std::string text;
  char buffer[4096];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      if (n < 0) return std::nullopt;
      return text;
    }
    text.append(buffer, static_cast<std::size_t>(n));
  }
}

/// `text` without leading and trailing whitespace.
inline std::string_view trim(std::string_view text) noexcept {
  constexpr std::string_view space = " \t\r\n";
  auto first = text.find_first_not_of(space);
  if (first == std::string_view::npos) return {};
  return text.substr(first, text.find_last_not_of(space) - first + 1);
}

/// `text` (whitespace around it allowed) as a decimal integer, or nullopt if it is anything else.
inline std::optional<long long> parse_integer(std::string_view text) noexcept {
  text = trim(text);
  long long value = 0;
  const char* end = text.data() + text.size();
  auto [stop, error] = std::from_chars(text.data(), end, value);
  if (text.empty() || error != std::errc() || stop != end) return std::nullopt;
  return value;
}

/// The CPUs a CFS quota of `quota` microseconds per `period` allows, or nullopt if either is not positive.
inline std::optional<double> quota_cpus(long long quota, long long period) noexcept {
  if (quota <= 0 || period <= 0) return std::nullopt;
  return static_cast<double>(quota) / static_cast<double>(period);
}

/**
 * Parses a cgroup v2 `cpu.max` file: "150000 100000" allows 1.5 CPUs.
 * @return quota / period, or nullopt for "max 100000" (no limit) and anything unparsable.
 */
inline std::optional<double> parse_cpu_max(std::string_view text) noexcept {
  text = trim(text);
  auto space = text.find_first_of(" \t");
  if (space == std::string_view::npos) return std::nullopt;
  auto quota = parse_integer(text.substr(0, space));  // "max" is no integer: no limit
  auto period = parse_integer(text.substr(space + 1));
  if (!quota || !period) return std::nullopt;
  return quota_cpus(*quota, *period);
}

/**
 * Parses cgroup v1's `cpu.cfs_quota_us` and `cpu.cfs_period_us` files: "150000" and "100000" allow 1.5 CPUs.
 * @return quota / period, or nullopt for a quota of -1 (no limit) and anything unparsable.
 */
inline std::optional<double> parse_cfs_quota(std::string_view quota_us, std::string_view period_us) noexcept {
  auto quota = parse_integer(quota_us);
  auto period = parse_integer(period_us);
  if (!quota || !period) return std::nullopt;
  return quota_cpus(*quota, *period);
}

/**
 * The directory of the cgroup `cgroup_path` (as /proc/self/cgroup names it) in the hierarchy mounted at `mount`, and
 * each of its ancestors up to `mount` itself: a quota on any of them limits the process.
 */
inline std::vector<std::string> cgroup_levels(const std::string& mount, std::string_view cgroup_path) {
  // The path's parts with "." and "a/.." taken out.
  std::vector<std::string_view> parts;
  while (!cgroup_path.empty()) {
    const auto slash = cgroup_path.find('/');
    const std::string_view part = cgroup_path.substr(0, slash);
    cgroup_path.remove_prefix(slash == std::string_view::npos ? cgroup_path.size() : slash + 1);
    if (part.empty() || part == ".") continue;
    if (part != "..") {
      parts.push_back(part);
    } else if (!parts.empty()) {
      parts.pop_back();
    } else {
      // "/.." is how the kernel names a cgroup outside this process's cgroup namespace: nothing under the mount
      // is known to be an ancestor of it.
      return {};
    }
  }
  std::vector<std::string> levels{mount};
  std::string dir = mount;
  for (const auto part : parts) {
    if (dir.empty() || dir.back() != '/') dir += '/';
    dir += part;
    levels.push_back(dir);
  }
  return levels;
}

/// Whether the comma-separated controller list of a /proc/self/cgroup line (e.g. "cpu,cpuacct") names `controller`.
inline bool has_controller(std::string_view controllers, std::string_view controller) noexcept {
  while (!controllers.empty()) {
    auto comma = controllers.find(',');
    if (controllers.substr(0, comma) == controller) return true;
    if (comma == std::string_view::npos) break;
    controllers.remove_prefix(comma + 1);
  }
  return false;
}

/**
 * The tightest CPU limit cgroups put on a process: the smallest quota / period over its cgroup and each ancestor,
 * from cgroup v2 `cpu.max` and cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` alike (a hybrid system has both).
 * Missing or unreadable files are no limit.
 * @param proc_self_cgroup the process's /proc/self/cgroup: lines "0::<path>" (v2) and "<id>:<controllers>:<path>" (v1).
 * @param root where cgroupfs is mounted: the v2 hierarchy itself, or one directory per v1 hierarchy named after its
 *             controllers ("cpu,cpuacct", as systemd and Docker mount them) or "cpu".
 * @return the CPUs allowed, possibly fractional; nullopt if no quota applies.
 * @throws std::bad_alloc only.
 */
inline std::optional<double> cgroup_cpu_limit(std::string_view proc_self_cgroup,
                                              const std::string& root = "/sys/fs/cgroup") {
  std::optional<double> limit;
  auto tighten = [&limit](std::optional<double> cpus) {
    if (cpus && (!limit || *cpus < *limit)) limit = cpus;
  };
  while (!proc_self_cgroup.empty()) {
    auto newline = proc_self_cgroup.find('\n');
    std::string_view line = proc_self_cgroup.substr(0, newline);
    proc_self_cgroup.remove_prefix(newline == std::string_view::npos ? proc_self_cgroup.size() : newline + 1);

    auto first = line.find(':');
    auto second = first == std::string_view::npos ? first : line.find(':', first + 1);
    if (second == std::string_view::npos) continue;
    std::string_view id = line.substr(0, first);
    std::string_view controllers = line.substr(first + 1, second - first - 1);
    std::string_view path = line.substr(second + 1);

    if (id == "0" && controllers.empty()) {
      // cgroup v2. In a container with its own cgroup namespace the path is "/" and root is the container's cgroup;
      // where the path does not exist under root, walking up still reaches root.
      for (const auto& dir : cgroup_levels(root, path)) {
        if (auto text = read_small_file(dir + "/cpu.max")) tighten(parse_cpu_max(*text));
      }
    } else if (has_controller(controllers, "cpu")) {
      std::string mount = root + "/" + std::string(controllers);
      struct ::stat info {};
      if (::stat(mount.c_str(), &info) != 0 || !S_ISDIR(info.st_mode)) mount = root + "/cpu";
      for (const auto& dir : cgroup_levels(mount, path)) {
        auto quota = read_small_file(dir + "/cpu.cfs_quota_us");
        auto period = quota ? read_small_file(dir + "/cpu.cfs_period_us") : std::nullopt;
        if (quota && period) tighten(parse_cfs_quota(*quota, *period));
      }
    }
  }
  return limit;
}

/// The CPUs in this process's `sched_getaffinity` mask, else the CPUs online, else 1.
inline std::size_t affinity_cpu_count() noexcept {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) == 0) {
    int count = CPU_COUNT(&set);
    if (count > 0) return static_cast<std::size_t>(count);
  }
  long online = ::sysconf(_SC_NPROCESSORS_ONLN);
  return online > 0 ? static_cast<std::size_t>(online) : 1;
}

/// `cpus` capped by a cgroup `limit` rounded up (1.5 CPUs of quota keep 2 workers busy), at least 1.
inline std::size_t limit_cpu_count(std::size_t cpus, std::optional<double> limit) noexcept {
  if (limit && std::ceil(*limit) < static_cast<double>(cpus)) cpus = static_cast<std::size_t>(std::ceil(*limit));
  return std::max<std::size_t>(cpus, 1);
}

}  // namespace detail

PROCPOOL_ENGINE_INLINE std::size_t cpu_count() noexcept {
  std::size_t cpus = detail::affinity_cpu_count();
  try {
    if (auto self = detail::read_small_file("/proc/self/cgroup")) {
      return detail::limit_cpu_count(cpus, detail::cgroup_cpu_limit(*self));
    }
  } catch (...) {
    // Out of memory reading a few small files: the affinity count stands.
  }
  return detail::limit_cpu_count(cpus, std::nullopt);
}

}  // namespace procpool
#endif

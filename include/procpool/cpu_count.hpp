// procpool - how many CPUs this process may use.
#pragma once

#include <sched.h>
#include <unistd.h>

#include <cstddef>

namespace procpool {

/**
 * The number of CPUs this process may run on (its `sched_getaffinity` mask),
 * at least 1. This is the default `Options::processes`.
 * This function is thread-safe.
 */
inline std::size_t cpu_count() noexcept {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) == 0) {
    int count = CPU_COUNT(&set);
    if (count > 0) return static_cast<std::size_t>(count);
  }
  long online = ::sysconf(_SC_NPROCESSORS_ONLN);
  return online > 0 ? static_cast<std::size_t>(online) : 1;
}

}  // namespace procpool

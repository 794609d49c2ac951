/// @file
/// How a pool starts its worker processes: procpool::StartMethod.
#pragma once

#include <string_view>

namespace procpool {

/**
 * How a pool starts its workers (Python's `multiprocessing` start methods),
 * chosen with `Options::start_method`.
 *
 * @code
 * procpool::Pool pool({.start_method = procpool::StartMethod::posix_spawn});
 * @endcode
 */
enum class StartMethod {
  /// Each worker is a fork() of the parent. Fastest to start; the worker sees
  /// the parent's memory as it was. Unsafe if other threads hold locks at the
  /// moment of the fork.
  fork,
  /// Each worker is a fresh run of the same binary that enters the worker
  /// loop in `procpool::init`. Inherits nothing.
  posix_spawn,
  /// A fresh single-threaded server process (started like posix_spawn) forks
  /// the workers. The default.
  forkserver,
};

/**
 * The name of a start method, e.g. for a log line.
 * @param method the start method.
 * @return "fork", "posix_spawn" or "forkserver" ("unknown" for a value
 *         outside the enumeration).
 *
 * This function is thread-safe.
 */
constexpr std::string_view to_string(StartMethod method) noexcept {
  switch (method) {
    case StartMethod::fork:
      return "fork";
    case StartMethod::posix_spawn:
      return "posix_spawn";
    case StartMethod::forkserver:
      return "forkserver";
  }
  return "unknown";
}

}  // namespace procpool

// procpool - how a pool starts its worker processes.
#pragma once

#include <string_view>

namespace procpool {

/**
 * How a pool starts its workers (Python's `multiprocessing` start methods).
 *
 * - `fork`: each worker is a fork() of the parent. Fastest to start; the
 *   worker sees the parent's memory as it was. Unsafe if other threads hold
 *   locks at the moment of the fork.
 * - `posix_spawn`: each worker is a fresh run of the same binary that enters
 *   the worker loop in `procpool::init`. Inherits nothing.
 * - `forkserver`: a fresh single-threaded server process (started like
 *   posix_spawn) forks the workers.
 */
enum class StartMethod { fork, posix_spawn, forkserver };

/// "fork", "posix_spawn" or "forkserver".
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

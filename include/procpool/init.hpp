/// @file
/// The one line a program's main() needs: procpool::init().
#pragma once

#include <sys/prctl.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "detail/launch_forkserver.hpp"
#include "detail/launch_spawn.hpp"
#include "detail/worker.hpp"

namespace procpool {

namespace detail {

/// A re-executed process is named "exe" (from /proc/self/exe) in ps and top;
/// it takes the program's name instead, as a forked one has.
inline void name_after_program(const char* argv0) {
  std::string_view name(argv0);
  if (auto slash = name.rfind('/'); slash != std::string_view::npos) name.remove_prefix(slash + 1);
  if (name.empty()) return;
  const std::string comm(name.substr(0, 15));  // the kernel keeps 15 characters
  ::prctl(PR_SET_NAME, comm.c_str(), 0, 0, 0);
}

}  // namespace detail

/**
 * Call first thing in `main`: `procpool::init(argc, argv);`.
 *
 * The `posix_spawn` and `forkserver` start methods run this program's own
 * binary again to start their processes; in such a process `init` becomes
 * the worker (or the fork server) and never returns, so the rest of `main`
 * never runs there (the analogue of Python's `if __name__ == "__main__":`
 * guard). In a program started normally it does nothing, so it is harmless
 * with `fork`. A program that forgets it gets a clear error, never a storm
 * of processes.
 *
 * @code
 * int main(int argc, char** argv) {
 *   procpool::init(argc, argv);
 *   procpool::Pool pool;
 *   // ...
 * }
 * @endcode
 *
 * @param argc `main`'s argc.
 * @param argv `main`'s argv; in a process procpool started, it says which
 *        role the process plays.
 *
 * This function is thread-safe.
 */
inline void init(int argc, char** argv) {
  // Before any fd of procpool's exists, in the program and in its workers.
  detail::occupy_closed_stdio();
  if (argc < 3 || argv == nullptr || argv[1] == nullptr) return;
  const bool worker = std::strcmp(argv[1], detail::worker_flag) == 0;
  const bool server = std::strcmp(argv[1], detail::forkserver_flag) == 0;
  if (!worker && !server) return;
  auto parent = static_cast<pid_t>(std::strtol(argv[2], nullptr, 10));
  // Our own children must not mistake themselves for procpool processes.
  ::unsetenv(detail::worker_env);
  if (argv[0] != nullptr) detail::name_after_program(argv[0]);
  if (server) detail::run_forkserver(3, parent);
  detail::prepare_worker_process(parent);
  const bool relayed = argc > 3 && argv[3] != nullptr && std::strcmp(argv[3], detail::relayed_output_flag) == 0;
  if (relayed) detail::use_relayed_output();
  // Its claim area, if the pool passed one (claims.hpp).
  const int claims = ::fcntl(detail::worker_claims_fd, F_GETFD) != -1 ? detail::worker_claims_fd : -1;
  detail::run_worker_and_exit(detail::worker_task_fd, detail::worker_result_fd, relayed, claims);
}

}  // namespace procpool

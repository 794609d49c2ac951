/// @file
/// The one line a program's main() needs: procpool::init().
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "detail/config.hpp"
#if PROCPOOL_DEFINE_ENGINE
#include "detail/launch_forkserver.hpp"
#include "detail/launch_spawn.hpp"
#include "detail/process_title.hpp"
#include "detail/worker.hpp"
#endif

namespace procpool {

/**
 * Call first thing in `main`: `procpool::init(argc, argv);`.
 *
 * The `posix_spawn` and `forkserver` start methods run this program's own
 * binary again to start their processes; in such a process `init` becomes
 * the worker (or the fork server) and never returns, so the rest of `main`
 * never runs there (the analogue of Python's `if __name__ == "__main__":`
 * guard). In a program started normally it marks where `main` begins: a
 * `fork` pool made before it (a global) forks its workers here. A program
 * that forgets it gets a clear error, never a storm of processes.
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
PROCPOOL_ENGINE_INLINE void init(int argc, char** argv);

}  // namespace procpool

#if PROCPOOL_DEFINE_ENGINE
namespace procpool {

PROCPOOL_ENGINE_INLINE void init(int argc, char** argv) {
  detail::init_called() = true;
  // Before any fd of procpool's exists, in the program and in its workers.
  detail::occupy_closed_stdio();
  detail::SelfCommand::instance().learn(argc);
  const bool ours = argc >= 3 && argv != nullptr && argv[1] != nullptr;
  const bool worker = ours && std::strcmp(argv[1], detail::worker_flag) == 0;
  const bool server = ours && std::strcmp(argv[1], detail::forkserver_flag) == 0;
  if (!worker && !server) {
    // The program itself: fork pools made before now (globals) fork their
    // workers here, as its static initialization is complete.
    detail::DeferredStarts::instance().run_all();
    return;
  }
  auto parent = static_cast<pid_t>(std::strtol(argv[2], nullptr, 10));
  // Our own children must not mistake themselves for procpool processes.
  ::unsetenv(detail::worker_env);
  // procpool's own argv: the worker or server names itself on it.
  detail::ProcessTitle::instance().own_args(argc, argv);
  if (server) detail::run_forkserver(3, parent);
  detail::prepare_worker_process(parent);
  const bool relayed = argc > 3 && argv[3] != nullptr && std::strcmp(argv[3], detail::relayed_output_flag) == 0;
  if (relayed) detail::use_relayed_output();
  // Its claim area, if the pool passed one (claims.hpp).
  const int claims = ::fcntl(detail::worker_claims_fd, F_GETFD) != -1 ? detail::worker_claims_fd : -1;
  detail::run_worker_and_exit(detail::worker_task_fd, detail::worker_result_fd, relayed, claims);
}

}  // namespace procpool
#endif

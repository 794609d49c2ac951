// procpool - the ways of starting a local worker process (fork,
// posix_spawn, the fork server): a new start method is a new Launcher. The
// pipe transport (pipe_link.hpp) starts its workers with one.
#pragma once

#include <signal.h>
#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>

#include "link.hpp"
#include "system.hpp"

namespace procpool::detail {

/// A started worker: its pid and the parent's ends of its two pipes.
struct LaunchedWorker {
  pid_t pid = -1;
  Fd task;                       // parent writes tasks here
  Fd result;                     // parent reads results here
  Fd pidfd;                      // readable once the worker has exited; may be empty
  std::uint64_t generation = 0;  // which incarnation of its launcher's machinery started it (a fork server)
};

class Launcher {
 public:
  virtual ~Launcher() = default;
  /// Starts one worker that runs `worker_main` on its ends of two fresh pipes,
  /// with `stdio` as its fds 1 and 2 when relayed, and `claims_fd` (its claim
  /// area, claims.hpp; -1 for none). The caller keeps `stdio`'s fds and
  /// `claims_fd` and closes them after the launch. Called only from the
  /// dispatcher's I/O thread. Throws std::system_error.
  virtual LaunchedWorker launch(const ChildStdio& stdio, int claims_fd) = 0;
  /// Collects the exit status of a worker that has exited (or is exiting).
  virtual int reap(const LaunchedWorker& worker) = 0;
  /// The exit status if the worker has already exited, without blocking.
  virtual std::optional<int> try_reap(const LaunchedWorker& worker) = 0;
  /// Reaps an exited worker whose status nobody needs (a worker that ended
  /// normally), without waiting for news of it where that costs a round trip.
  virtual void release(const LaunchedWorker& worker) { reap(worker); }
  /// Sends a signal to a worker; a worker that is already gone is not an error.
  virtual void kill(const LaunchedWorker& worker, int sig) {
    if (worker.pid > 0) ::kill(worker.pid, sig);
  }
  /// For start methods that re-run the program's binary: what to tell the
  /// user when a worker dies before it is ready (usually a missing
  /// procpool::init). Such a death is then final: the pool stops replacing
  /// workers instead of re-running the program again and again.
  virtual std::string start_hint() const { return {}; }
  /// After the pool's last worker has exited: lets go of what the launcher
  /// runs besides the workers (the fork server), and reaps it.
  virtual void shutdown() noexcept {}
};

/// reap/try_reap for workers that are the parent's own children.
class ChildLauncher : public Launcher {
 public:
  int reap(const LaunchedWorker& worker) override {
    int status = 0;
    if (retry_eintr([&] { return ::waitpid(worker.pid, &status, 0); }) == -1) return gone_status();
    return status;
  }
  std::optional<int> try_reap(const LaunchedWorker& worker) override {
    int status = 0;
    pid_t r = retry_eintr([&] { return ::waitpid(worker.pid, &status, WNOHANG); });
    if (r == 0) return std::nullopt;
    return r == worker.pid ? status : gone_status();
  }

 private:
  /// A child waitpid() cannot report (ECHILD): the system reaped it (SIGCHLD
  /// ignored), or another waitpid() of the program's did (a SIGCHLD handler
  /// reaping every child). How it ended is lost.
  static int gone_status() { return wait_status_unknown; }
};

}  // namespace procpool::detail

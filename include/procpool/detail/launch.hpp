// procpool - picks the Launcher for a start method, and the checks that
// come with choosing one.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>

#include <fmt/format.h>

#include "../errors.hpp"
#include "../options.hpp"
#include "launch_fork.hpp"
#include "launch_forkserver.hpp"
#include "launch_spawn.hpp"
#include "launcher.hpp"
#include "pipe_link.hpp"

namespace procpool::detail {

/// A re-executed worker or fork server whose main() never called
/// procpool::init reaches the Pool constructor: stop it before it starts
/// processes of its own (a spawn storm) and say what to add.
inline void refuse_uninitialized_worker() {
  if (std::getenv(worker_env) == nullptr) return;
  fmt::print(stderr,
             "procpool: error: this process (pid {}) was started by procpool to become a worker, but main() "
             "created a Pool without calling procpool::init(argc, argv) first. Add `procpool::init(argc, argv);` "
             "as the first line of main().\n",
             ::getpid());
  std::fflush(nullptr);
  ::_exit(exit_missing_init);
}

/// fork() copies only the calling thread; a lock another thread holds at
/// that moment stays locked forever in the child.
inline std::string threaded_fork_problem() {
  int others = thread_count() - io_thread_count().load();
  // A thread joined a moment ago may still be counted: the kernel lets it
  // go just after pthread_join() returns (seen under load, once in
  // hundreds of pools). One still there after 10 ms is running.
  for (int look = 0; others > 1 && look < 10; ++look) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    others = thread_count() - io_thread_count().load();
  }
  if (others <= 1) return {};
  return fmt::format(
      "StartMethod::fork while this program runs {} threads: a forked worker inherits every lock another "
      "thread holds at that moment and can deadlock on it. Use StartMethod::forkserver (the default) or "
      "StartMethod::posix_spawn",
      others);
}

inline void check_threaded_fork(bool is_error) {
  static std::atomic<bool> warned{false};
  if (!is_error && warned.load()) return;  // once is enough
  std::string problem = threaded_fork_problem();
  if (problem.empty()) return;
  if (is_error) throw Error("procpool: " + problem + ".");
  if (!warned.exchange(true)) {
    fmt::print(stderr, "procpool: warning: {}, or set Options::error_on_threaded_fork to make this an error.\n",
               problem);
  }
}

class CheckedForkLauncher final : public Launcher {
 public:
  explicit CheckedForkLauncher(bool error_on_threads) : error_on_threads_(error_on_threads) {}
  LaunchedWorker launch(const ChildStdio& stdio, int claims_fd) override {
    check_threaded_fork(error_on_threads_);
    return fork_.launch(stdio, claims_fd);
  }
  int reap(const LaunchedWorker& worker) override { return fork_.reap(worker); }
  std::optional<int> try_reap(const LaunchedWorker& worker) override { return fork_.try_reap(worker); }

 private:
  bool error_on_threads_;
  ForkLauncher fork_;
};

inline std::unique_ptr<Launcher> make_launcher(const Options& options) {
  refuse_uninitialized_worker();
  occupy_closed_stdio();
  switch (options.start_method) {
    case StartMethod::fork:
      check_threaded_fork(options.error_on_threaded_fork);
      return std::make_unique<CheckedForkLauncher>(options.error_on_threaded_fork);
    case StartMethod::posix_spawn:
      return std::make_unique<SpawnLauncher>();
    case StartMethod::forkserver:
      return std::make_unique<ForkserverLauncher>();
  }
  throw Error("procpool: unknown StartMethod");
}

/// The transport a pool's options ask for: local worker processes.
inline std::unique_ptr<Transport> make_transport(const Options& options) {
  if (!options.backend.local()) return options.backend.impl()->make_transport(options);
  return std::make_unique<PipeTransport>(make_launcher(options));
}

}  // namespace procpool::detail

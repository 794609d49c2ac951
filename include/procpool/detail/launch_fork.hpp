// procpool - StartMethod::fork: each worker is a fork() of the parent.
#pragma once

#include <cstdio>
#include <mutex>

#include "launcher.hpp"
#include "registry.hpp"
#include "worker.hpp"

namespace procpool::detail {

class ForkLauncher final : public ChildLauncher {
 public:
  LaunchedWorker launch(const ChildStdio& stdio, int claims_fd) override {
    Pipe task = make_pipe();
    Pipe result = make_pipe();
    // Anything buffered now would be written twice: once by each process.
    std::fflush(nullptr);
    const pid_t parent = ::getpid();
    pid_t pid;
    {
      // Holding the fd registry across fork() makes the child's list of fds
      // to close exact. Both registries' locks are held so that neither is
      // copied locked by some other thread: the child needs both.
      std::unique_lock lock(FdRegistry::instance().mutex());
      std::unique_lock handlers_lock(HandlerRegistry::instance().mutex());
      std::vector<int> inherited = FdRegistry::instance().snapshot_locked();
      pid = ::fork();
      if (pid == 0) {
        const int keep_read = task.read.get(), keep_write = result.write.get();
        if (stdio.relayed()) {
          // Before the registered fds go: the relay's pipe ends are among them.
          ::dup2(stdio.out, 1);
          ::dup2(stdio.err, 2);
        }
        // Siblings' pipe ends must go, or they never see EOF (see FdRegistry).
        for (int fd : inherited) {
          if (fd != keep_read && fd != keep_write && fd != claims_fd) ::close(fd);
        }
        FdRegistry::instance().clear_locked();
        handlers_lock.unlock();
        lock.unlock();
        prepare_worker_process(parent);
        if (stdio.relayed()) use_relayed_output();
        run_worker_and_exit(keep_read, keep_write, stdio.relayed(), claims_fd);
      }
    }
    if (pid < 0) throw_errno("fork");
    task.read.reset();
    result.write.reset();
    return {pid, std::move(task.write), std::move(result.read), open_pidfd(pid)};
  }
};

}  // namespace procpool::detail

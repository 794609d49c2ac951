// procpool - the local transport: worker processes on this machine, started
// by a Launcher (fork, posix_spawn, the fork server), reached through two
// pipes. Large frames travel through shared memory (task_memory.hpp), which
// the dispatcher offers because this transport shares_memory().
#pragma once

#include <cerrno>
#include <memory>
#include <optional>
#include <span>

#include "launcher.hpp"
#include "link.hpp"
#include "outbox.hpp"
#include "protocol.hpp"
#include "system.hpp"

namespace procpool::detail {

class PipeLink final : public Link {
 public:
  PipeLink(Launcher& launcher, LaunchedWorker proc) : launcher_(launcher), proc_(std::move(proc)) {}
  PipeLink(const PipeLink&) = delete;
  PipeLink& operator=(const PipeLink&) = delete;

  pid_t pid() const noexcept override { return proc_.pid; }

  void send(std::shared_ptr<const TaskBytes> frame, std::span<const char> head) override {
    outbox_.push(std::move(frame), head.data(), head.size());
  }
  bool has_unsent() const noexcept override { return !outbox_.empty(); }
  void flush() noexcept override {
    // Gone (EPIPE): its death is noticed through its pidfd or EOF.
    if (proc_.task) outbox_.flush(proc_.task.get());
  }
  bool sending() const noexcept override { return static_cast<bool>(proc_.task); }
  void close_sending() noexcept override {
    // A worker exits on a stop frame or on EOF. EOF alone is not enough: a
    // process the program fork()ed holds a copy of the pipe's write end for
    // as long as it lives. The frame is sent only if nothing is queued
    // before it, and fits in the pipe at once (a full pipe leaves EOF).
    if (proc_.task && outbox_.empty()) {
      char stop[frame_header_size];
      encode_empty(stop, FrameKind::stop);
      outbox_.push(nullptr, stop, sizeof(stop));
      outbox_.flush(proc_.task.get());
    }
    proc_.task.reset();
    outbox_.clear();
  }

  long receive(std::span<char> space) noexcept override {
    ssize_t n = retry_eintr([&] { return ::read(proc_.result.get(), space.data(), space.size()); });
    if (n < 0) return errno == EAGAIN ? nothing_yet : broken;
    return static_cast<long>(n);
  }

  int receive_fd() const noexcept override { return proc_.result.get(); }
  int send_fd() const noexcept override { return proc_.task.get(); }
  int end_fd() const noexcept override { return proc_.pidfd ? proc_.pidfd.get() : -1; }

  void kill(int sig) noexcept override { launcher_.kill(proc_, sig); }
  std::optional<int> try_reap() override { return launcher_.try_reap(proc_); }
  int reap() override { return launcher_.reap(proc_); }
  void release() override { launcher_.release(proc_); }

 private:
  Launcher& launcher_;
  LaunchedWorker proc_;
  Outbox outbox_;
};

/// Local worker processes, started by `launcher`.
class PipeTransport final : public Transport {
 public:
  explicit PipeTransport(std::unique_ptr<Launcher> launcher) : launcher_(std::move(launcher)) {}

  std::unique_ptr<Link> start(const ChildStdio& stdio, int claims_fd) override {
    LaunchedWorker proc = launcher_->launch(stdio, claims_fd);
    try {
      set_nonblocking(proc.task.get());
      set_nonblocking(proc.result.get());
      return std::make_unique<PipeLink>(*launcher_, std::move(proc));
    } catch (...) {
      launcher_->kill(proc, SIGKILL);
      launcher_->reap(proc);
      throw;
    }
  }
  std::string start_hint() const override { return launcher_->start_hint(); }
  void shutdown() noexcept override { launcher_->shutdown(); }

 private:
  std::unique_ptr<Launcher> launcher_;
};

}  // namespace procpool::detail

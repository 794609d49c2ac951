// procpool - the MPI transport, rank 0's side: a Link for each worker on a
// serving rank, and the Transport that starts them, both over the pool's
// MpiHub (mpi_hub.hpp).
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>

#include "../options.hpp"
#include "link.hpp"
#include "mpi_hub.hpp"

namespace procpool::detail {

class MpiLink final : public Link {
 public:
  MpiLink(std::shared_ptr<MpiHub> hub, std::shared_ptr<MpiWorker> w) : hub_(std::move(hub)), w_(std::move(w)) {}
  MpiLink(const MpiLink&) = delete;
  MpiLink& operator=(const MpiLink&) = delete;
  ~MpiLink() override { hub_->drop(*w_); }

  pid_t pid() const noexcept override { return w_->pid; }
  std::shared_ptr<const std::string> where() const override { return hub_->where(*w_); }

  void send(std::shared_ptr<const TaskBytes> frame, std::span<const char> head) override {
    if (sending_) hub_->send(w_, std::move(frame), head);
  }
  bool has_unsent() const noexcept override { return false; }  // the pump took it
  void flush() noexcept override {}
  bool sending() const noexcept override { return sending_; }
  void close_sending() noexcept override {
    if (!std::exchange(sending_, false)) return;
    try {
      hub_->order(w_, MpiHub::Command::close_sending);
    } catch (...) {
      // Out of memory: the pool's end stops it.
    }
  }

  long receive(std::span<char> space) noexcept override {
    try {
      return hub_->receive(*w_, space);
    } catch (...) {
      return broken;
    }
  }
  int receive_fd() const noexcept override { return w_->event.get(); }
  int send_fd() const noexcept override { return -1; }
  int end_fd() const noexcept override { return -1; }  // the end of its stream is its end

  void kill(int sig) noexcept override {
    try {
      hub_->order(w_, MpiHub::Command::kill, sig);
    } catch (...) {
    }
  }
  std::optional<int> try_reap() override { return hub_->try_reap(*w_); }
  int reap() override { return hub_->reap(*w_); }
  void release() override {}

 private:
  std::shared_ptr<MpiHub> hub_;
  std::shared_ptr<MpiWorker> w_;
  bool sending_ = true;
};

/// Workers on MPI ranks. `on_stop` runs once the pool is done with them
/// (spawn mode lets its ranks go there).
class MpiTransport final : public Transport {
 public:
  MpiTransport(MpiHub::Settings settings, const Options& options, std::function<void(MpiHub&)> on_stop = {})
      : hub_(std::make_shared<MpiHub>(std::move(settings), options)), on_stop_(std::move(on_stop)) {
    std::lock_guard lock(live_mutex());
    live().insert(this);
  }
  ~MpiTransport() override {
    {
      std::lock_guard lock(live_mutex());
      live().erase(this);
    }
    shutdown();
  }

  std::unique_ptr<Link> start(const ChildStdio&, int) override {
    return std::make_unique<MpiLink>(hub_, hub_->start());
  }
  bool shares_memory() const noexcept override { return false; }
  std::size_t default_processes() const override { return hub_->cpus(); }
  void shutdown() noexcept override {
    if (stopped_.exchange(true)) return;
    hub_->stop();
    if (on_stop_) on_stop_(*hub_);
  }

  /// MPI is about to be finalized: every pool still alive (held in a
  /// global) lets its ranks go now. Its running tasks fail with WorkerLost
  /// saying so, and its calls then throw PoolNotRunning.
  static void shutdown_all() noexcept {
    std::lock_guard lock(live_mutex());
    for (MpiTransport* t : live()) {
      t->hub_->stop(wait_status_let_go);
      t->shutdown();
    }
  }

 private:
  static std::mutex& live_mutex() {
    static auto* m = new std::mutex;  // never destroyed: used at exit
    return *m;
  }
  static std::set<MpiTransport*>& live() {
    static auto* transports = new std::set<MpiTransport*>;
    return *transports;
  }

  std::shared_ptr<MpiHub> hub_;
  std::function<void(MpiHub&)> on_stop_;
  std::atomic<bool> stopped_{false};
};

}  // namespace procpool::detail

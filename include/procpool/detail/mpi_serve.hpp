// procpool - a serving rank: hosts worker processes of its own, started by
// the local transport (pipe_link.hpp), for the pool on rank 0, and relays
// the bytes between them and rank 0 (mpi_wire.hpp). It runs no task itself;
// only its workers do, so it always answers, and a task that crashes costs
// that task and its worker, never the rank.
#pragma once

#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "../cpu_count.hpp"
#include "../options.hpp"
#include "launch.hpp"
#include "mpi_wire.hpp"

namespace procpool::detail {

class RankServer {
  using Clock = std::chrono::steady_clock;

 public:
  /// Serves the rank `boss` of `comm` (rank 0 of the world, or the spawning
  /// program across an intercommunicator).
  RankServer(MPI_Comm comm, int boss, bool spawned) : comm_(comm), boss_(boss), spawned_(spawned) {}

  /// Serves until rank 0 says `finish`, then leaves MPI and exits.
  [[noreturn]] void run() {
    // A write to a worker that just died fails with EPIPE; the signal would end the rank.
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    ::pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
    auto next_look = Clock::now();
    for (;;) {
      if (Clock::now() >= next_look) {
        look_for_ends();
        next_look = Clock::now() + std::chrono::milliseconds(20);
      }
      bool busy = take_messages();
      for (auto it = locals_.begin(); it != locals_.end();) {
        busy = pump(it->first, it->second) || busy;
        it = it->second.gone ? locals_.erase(it) : std::next(it);
      }
      const bool sending = sends_.progress();
      if (open_ && Clock::now() - last_beat_ >= beat_every_) {
        sends_.send(comm_, boss_, mpi_wire::tag(mpi_wire::beat), {});
        last_beat_ = Clock::now();
      }
      // Rank 0 takes in what was sent before it lets this rank go; sends
      // it never takes are given up after a while, and MPI left all the same.
      if (finishing_ && (!sending || Clock::now() - finishing_since_ > mpi_wire::give_up_sends)) finish();
      if (busy) {
        idle_ = 0;
        idle_since_ = Clock::now();
      } else {
        ++idle_;
        wait(sending);
      }
    }
  }

 private:
  struct Local {
    std::unique_ptr<Link> link;
    bool eof = false;           // its stream ended
    std::optional<int> status;  // it was reaped
    bool gone = false;          // `ended` sent: forget it
  };

  /// A worker may end while its result pipe stays open (a child it forked
  /// without exec holds it): its end is news of its own.
  void look_for_ends() {
    for (auto& [id, local] : locals_) {
      if (!local.eof && !local.status) local.status = local.link->try_reap();
    }
  }

  /// Handles what rank 0 sent. Returns whether there was anything.
  bool take_messages() {
    auto take = [&](MPI_Message& msg, MPI_Status& status) { handle(msg, status); };
    return mpi_wire::take_waiting(comm_, boss_, take) > 0;
  }

  void handle(MPI_Message& msg, MPI_Status& status) {
    const auto kind = mpi_wire::kind_of(status.MPI_TAG);
    const auto id = mpi_wire::id_of(status.MPI_TAG);
    if (kind == mpi_wire::data) {
      int count = 0;
      MPI_Get_count(&status, MPI_BYTE, &count);
      auto frame = std::make_shared<TaskBytes>(static_cast<std::size_t>(count));
      MPI_Mrecv(frame->data(), count, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
      auto it = locals_.find(id);
      if (it == locals_.end() || !it->second.link->sending()) return;
      it->second.link->send(std::move(frame));
      it->second.link->flush();
      return;
    }
    const mpi_wire::Received bytes = mpi_wire::receive(msg, status);
    switch (kind) {
      case mpi_wire::open:
        open_pool(bytes);
        break;
      case mpi_wire::start:
        start(id);
        break;
      case mpi_wire::close_sending:
        if (auto it = locals_.find(id); it != locals_.end()) it->second.link->close_sending();
        break;
      case mpi_wire::kill:
        if (auto it = locals_.find(id); it != locals_.end()) {
          it->second.link->kill(mpi_wire::Reader(bytes).get<std::int32_t>());
        }
        break;
      case mpi_wire::close:
        close_pool();
        sends_.send(comm_, boss_, mpi_wire::tag(mpi_wire::closed), {});
        break;
      case mpi_wire::finish:
        close_pool();
        if (!std::exchange(finishing_, true)) finishing_since_ = Clock::now();
        break;
      default:
        break;  // not for a serving rank
    }
  }

  void open_pool(std::span<const char> bytes) {
    close_pool();
    mpi_wire::HelloMessage hello;
    hello.cpus = static_cast<std::uint32_t>(cpu_count());
    hello.pid = static_cast<std::int32_t>(::getpid());
    hello.build = mpi_wire::build_id();
    hello.host = mpi_wire::host_name();
    try {
      const auto open = mpi_wire::OpenMessage::decode(bytes);
      if (open.version != mpi_wire::version) {
        throw std::runtime_error(
            fmt::format("it speaks version {} of procpool's MPI protocol, not {}", mpi_wire::version, open.version));
      }
      Options options;
      options.start_method = static_cast<StartMethod>(open.start_method);
      options.error_on_threaded_fork = open.error_on_threaded_fork != 0;
      transport_ = std::make_unique<PipeTransport>(make_launcher(options));
      beat_every_ = std::chrono::milliseconds(open.beat_ms);
      open_ = true;
      last_beat_ = Clock::now();
    } catch (const std::exception& e) {
      hello.error = e.what();
    }
    sends_.send(comm_, boss_, mpi_wire::tag(mpi_wire::hello), hello.encode());
  }

  /// Stops every worker of the pool and lets go of its launcher.
  void close_pool() {
    for (auto& [id, local] : locals_) {
      if (local.status) continue;
      local.link->kill(SIGKILL);
      local.link->reap();
    }
    locals_.clear();
    if (transport_ != nullptr) transport_->shutdown();
    transport_.reset();
    open_ = false;
  }

  void start(std::uint32_t id) {
    const int reply = mpi_wire::tag(mpi_wire::started, id);
    try {
      if (transport_ == nullptr) throw StartRefused("the serving rank has no pool open");
      std::unique_ptr<Link> link = transport_->start(ChildStdio{}, -1);
      // Large messages cross these pipes too (there is no shared memory
      // with rank 0): fewer, larger writes when the pipes are larger.
      for (int fd : {link->send_fd(), link->receive_fd()}) {
        if (fd >= 0) (void)::fcntl(fd, F_SETPIPE_SZ, 1 << 20);
      }
      const auto pid = static_cast<std::int32_t>(link->pid());
      locals_[id].link = std::move(link);
      sends_.send(comm_, boss_, reply, mpi_wire::Writer().put(pid).take());
    } catch (const std::exception& e) {
      const bool refused = dynamic_cast<const StartRefused*>(&e) != nullptr;
      sends_.send(comm_, boss_, mpi_wire::tag(mpi_wire::start_failed, id),
                  mpi_wire::Writer().put(static_cast<std::uint8_t>(refused)).put(std::string(e.what())).take());
    }
  }

  /// Moves one worker's bytes on; sends `ended` once it is gone. Returns
  /// whether anything moved.
  bool pump(std::uint32_t id, Local& local) {
    Link& link = *local.link;
    bool moved = false;
    if (link.has_unsent()) link.flush();
    if (!local.eof) moved = forward(id, local);
    if (local.eof) {
      if (!local.status) local.status = link.try_reap();
      if (const std::optional<int>& status = local.status) {
        sends_.send(comm_, boss_, mpi_wire::tag(mpi_wire::ended, id),
                    mpi_wire::Writer().put(static_cast<std::int32_t>(*status)).take());
        local.gone = true;
        moved = true;
      }
    }
    return moved;
  }

  /// Sends what the worker wrote, up to 4 MiB, as one message: a little
  /// into the scratch buffer (copied out), more straight into a buffer of
  /// its own that the send then holds.
  bool forward(std::uint32_t id, Local& local) {
    constexpr std::size_t small = 64 << 10, large = 4 << 20;
    if (scratch_ == nullptr) scratch_ = std::make_unique_for_overwrite<char[]>(small);
    std::unique_ptr<char[]> own;
    char* buffer = scratch_.get();
    std::size_t used = 0, capacity = small;
    for (;;) {
      if (used == capacity) {
        if (own != nullptr) break;
        own = std::make_unique_for_overwrite<char[]>(large);
        std::memcpy(own.get(), buffer, used);
        buffer = own.get();
        capacity = large;
      }
      const long n = local.link->receive({buffer + used, capacity - used});
      if (n > 0) {
        used += static_cast<std::size_t>(n);
        continue;
      }
      // Ended, with its pipe held open elsewhere: what it wrote is all read.
      if (n == 0 || n == Link::broken || local.status) local.eof = true;
      break;
    }
    if (used == 0) return false;
    if (own == nullptr) {
      own = std::make_unique_for_overwrite<char[]>(used);
      std::memcpy(own.get(), buffer, used);
    }
    sends_.send(comm_, boss_, mpi_wire::tag(mpi_wire::data, id), std::move(own), used);
    return true;
  }

  /// Nothing moved: waits for a worker, or a while for rank 0 (MPI has no
  /// fd to wait on; mpi_wire::rest_us says how long).
  void wait(bool sending) {
    if (idle_ < 64) return;
    std::vector<pollfd> fds;
    bool ending = false;
    for (auto& [id, local] : locals_) {
      Link& link = *local.link;
      if (!local.eof) fds.push_back({link.receive_fd(), POLLIN, 0});
      if (link.has_unsent() && link.sending()) fds.push_back({link.send_fd(), POLLOUT, 0});
      if (local.eof) {
        if (link.end_fd() >= 0) {
          fds.push_back({link.end_fd(), POLLIN, 0});
        } else {
          ending = true;
        }
      }
    }
    const long us = mpi_wire::rest_us(Clock::now() - idle_since_, sending || ending);
    const timespec timeout{0, us * 1000};
    ::ppoll(fds.data(), fds.size(), &timeout, nullptr);
  }

  /// Answers `finish` (nothing more comes from here), leaves MPI and exits.
  [[noreturn]] void finish() {
    sends_.abandon_all();
    sends_.send(comm_, boss_, mpi_wire::tag(mpi_wire::finished), {});
    const auto deadline = Clock::now() + std::chrono::seconds(2);
    while (sends_.progress() && Clock::now() < deadline) ::usleep(100);
    sends_.abandon_all();
    if (spawned_) MPI_Comm_disconnect(&comm_);
    MPI_Finalize();
    std::exit(0);
  }

  MPI_Comm comm_;
  int boss_;
  bool spawned_;
  std::unique_ptr<Transport> transport_;
  std::map<std::uint32_t, Local> locals_;
  mpi_wire::Sends sends_;
  std::unique_ptr<char[]> scratch_;
  bool open_ = false;
  bool finishing_ = false;
  Clock::time_point finishing_since_{};
  std::chrono::milliseconds beat_every_{500};
  Clock::time_point last_beat_{};
  long idle_ = 0;
  Clock::time_point idle_since_{};
};

}  // namespace procpool::detail

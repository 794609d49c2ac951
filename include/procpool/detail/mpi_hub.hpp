// procpool - the MPI transport's hub on rank 0 (mpi_link.hpp holds its Link
// and Transport): each worker is a process on a serving rank
// (mpi_serve.hpp), reached through MPI messages (mpi_wire.hpp). One thread of
// the pool, the pump, makes every MPI call of the pool once it runs: it sends
// what the Links queue, receives what the ranks send, and signals each Link's
// eventfd, which the dispatcher polls. A rank not heard from for `lost_after`
// is taken for lost: its workers end as killed, and their tasks fail with
// WorkerLost (or are retried).
#pragma once

#include <sys/eventfd.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../options.hpp"
#include "link.hpp"
#include "mpi_wire.hpp"
#include "system.hpp"
#include "thread.hpp"

namespace procpool::detail {

/// One worker on a serving rank, as the pump and its Link share it.
struct MpiWorker {
  enum class Stage { starting, running, failed, ended };
  std::size_t peer = 0;
  std::uint32_t id = 0;
  Fd event;  // readable when `inbound` has bytes or the worker ended
  // ---- with the hub's mutex held ----
  Stage stage = Stage::starting;
  pid_t pid = 0;
  int status = 0;
  std::string failure;  // why it could not start
  bool refused = false;
  std::deque<mpi_wire::Received> inbound;
  std::size_t offset = 0;  // read of inbound.front()
  bool dropped = false;    // its Link is gone
  std::shared_ptr<const std::string> where;
};

/// What rank 0 knows of one serving rank.
struct MpiPeer {
  int rank = 0;  // in the communicator
  std::string host;
  pid_t pid = 0;
  std::size_t cpus = 1;
  std::shared_ptr<const std::string> where;  // "rank 2 on node7"
  std::chrono::steady_clock::time_point heard{};
  bool lost = false;
  bool closed = false;
  std::size_t live = 0;  // workers started there and not ended
  std::vector<std::uint32_t> free_ids;
  std::uint32_t next_id = 0;
};

/// The state the pump, the transport and the links share.
class MpiHub {
  using Clock = std::chrono::steady_clock;

 public:
  struct Settings {
    MPI_Comm comm = MPI_COMM_NULL;
    std::vector<int> ranks;  // the serving ranks, in comm
    std::chrono::milliseconds lost_after{5000};
    /// How messages name a serving rank: "rank" (of the world), or
    /// "spawned rank" (numbered from 0 in its own job, beside the caller's rank 0).
    std::string rank_name = "rank";
  };

  MpiHub(Settings settings, const Options& options)
      : comm_(settings.comm),
        // milliseconds::max() would overflow the clock: 100 years is for ever enough.
        lost_after_(std::min<std::chrono::milliseconds>(settings.lost_after, std::chrono::hours(24 * 365 * 100))),
        max_ids_(mpi_wire::max_ids(settings.comm)),
        rank_name_(settings.rank_name) {
    wake_ = make_tracked("eventfd", [] { return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); });
    peers_.resize(settings.ranks.size());
    for (std::size_t k = 0; k < peers_.size(); ++k) peers_[k].rank = settings.ranks[k];
    for (std::size_t k = 0; k < peers_.size(); ++k) by_rank_[peers_[k].rank] = k;
    handshake(options);
    pump_ = InternalThread("the pool's MPI thread", [this] { pump(); });
  }
  MpiHub(const MpiHub&) = delete;
  MpiHub& operator=(const MpiHub&) = delete;
  ~MpiHub() { stop(); }

  /// Ends the pool on every rank (they stop what workers are left) and
  /// stops the pump. Workers not known to have ended end with `left_status`
  /// (killed, or let go at MPI_Finalize): no wait for news that cannot come.
  /// Idempotent.
  void stop(int left_status = SIGKILL) noexcept {
    {
      std::lock_guard lock(mutex_);
      if (stopping_) return;
      stopping_ = true;
    }
    wake();
    pump_.join();
    std::lock_guard lock(mutex_);
    std::vector<MpiWorker*> left;
    for (auto& [key, w] : workers_) left.push_back(w.get());
    for (MpiWorker* w : left) end(*w, left_status);
  }

  std::size_t cpus() const {
    std::lock_guard lock(mutex_);
    std::size_t n = 0;
    for (const auto& p : peers_) n += p.lost ? 0 : p.cpus;
    return std::max<std::size_t>(n, 1);
  }
  bool any_lost() const {
    std::lock_guard lock(mutex_);
    return std::any_of(peers_.begin(), peers_.end(), [](const MpiPeer& p) { return p.lost; });
  }
  std::vector<int> lost_ranks() const {
    std::lock_guard lock(mutex_);
    std::vector<int> out;
    for (const auto& p : peers_) {
      if (p.lost) out.push_back(p.rank);
    }
    return out;
  }

  /// The host and pid of each serving rank that said hello, lost or not, by rank.
  std::map<int, std::pair<std::string, pid_t>> whereabouts() const {
    std::lock_guard lock(mutex_);
    std::map<int, std::pair<std::string, pid_t>> out;
    for (const auto& p : peers_) {
      if (p.pid != 0) out[p.rank] = {p.host, p.pid};
    }
    return out;
  }

  /// The host and pid of each serving rank that said hello and was not lost.
  std::vector<std::pair<std::string, pid_t>> processes() const {
    std::lock_guard lock(mutex_);
    std::vector<std::pair<std::string, pid_t>> out;
    for (const auto& p : peers_) {
      if (p.pid != 0 && !p.lost) out.emplace_back(p.host, p.pid);
    }
    return out;
  }

  /// Starts a worker on the rank with the fewest per CPU; waits for its pid.
  std::shared_ptr<MpiWorker> start() {
    auto w = std::make_shared<MpiWorker>();
    w->event = make_tracked("eventfd", [] { return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); });
    std::unique_lock lock(mutex_);
    if (stopping_) throw StartRefused("the pool's MPI ranks were let go (MPI was finalized); make a new pool", true);
    MpiPeer* best = nullptr;
    for (auto& p : peers_) {
      if (p.lost) continue;
      if (best == nullptr || p.live * best->cpus < best->live * p.cpus) best = &p;
    }
    if (best == nullptr) throw StartRefused("every serving MPI rank of the pool was lost");
    if (best->free_ids.empty() && best->next_id >= max_ids_) throw std::runtime_error("too many workers on one rank");
    w->peer = static_cast<std::size_t>(best - peers_.data());
    if (best->free_ids.empty()) {
      w->id = best->next_id++;
    } else {
      w->id = best->free_ids.back();
      best->free_ids.pop_back();
    }
    w->where = best->where;
    ++best->live;
    workers_[key(w->peer, w->id)] = w;
    commands_.push_back(Command{Command::start, w, {}, {}, 0});
    lock.unlock();
    wake_if_sleeping();
    lock.lock();
    cv_.wait(lock, [&] { return w->stage != MpiWorker::Stage::starting; });
    if (w->stage == MpiWorker::Stage::failed) {
      std::string why = fmt::format("{}: {}", *w->where, w->failure);
      forget(*w);
      if (w->refused) throw StartRefused(why);
      throw std::runtime_error(why);
    }
    return w;
  }

  // ---- what a Link asks for ----------------------------------------------------

  void send(const std::shared_ptr<MpiWorker>& w, std::shared_ptr<const TaskBytes> frame, std::span<const char> head) {
    constexpr std::size_t copy_below = 32 << 10;
    std::unique_lock lock(mutex_);
    if (frame->size() + head.size() < copy_below) {
      std::vector<char> bytes;
      bytes.reserve(head.size() + frame->size());
      bytes.insert(bytes.end(), head.begin(), head.end());
      bytes.insert(bytes.end(), frame->begin(), frame->end());
      commands_.push_back(Command{Command::data, w, {}, std::move(bytes), 0});
    } else {
      if (!head.empty()) commands_.push_back(Command{Command::data, w, {}, {head.begin(), head.end()}, 0});
      commands_.push_back(Command{Command::data, w, std::move(frame), {}, 0});
    }
    lock.unlock();
    wake_if_sleeping();
  }
  void order(const std::shared_ptr<MpiWorker>& w, int what, int sig = 0) {
    {
      std::lock_guard lock(mutex_);
      if (w->stage == MpiWorker::Stage::ended) return;
      commands_.push_back(Command{what, w, {}, {}, sig});
    }
    wake_if_sleeping();
  }
  long receive(MpiWorker& w, std::span<char> space) {
    std::unique_lock lock(mutex_);
    if (w.inbound.empty()) {
      lock.unlock();
      std::uint64_t drained;
      [[maybe_unused]] auto n = ::read(w.event.get(), &drained, sizeof(drained));
      lock.lock();
      if (w.inbound.empty()) return w.stage == MpiWorker::Stage::ended ? 0 : Link::nothing_yet;
    }
    std::size_t got = 0;
    while (got < space.size() && !w.inbound.empty()) {
      auto& front = w.inbound.front();
      const std::size_t n = std::min(space.size() - got, front.size - w.offset);
      std::memcpy(space.data() + got, front.data.get() + w.offset, n);
      got += n;
      w.offset += n;
      if (w.offset == front.size) {
        w.inbound.pop_front();
        w.offset = 0;
      }
    }
    return static_cast<long>(got);
  }
  std::optional<int> try_reap(const MpiWorker& w) {
    std::lock_guard lock(mutex_);
    if (w.stage != MpiWorker::Stage::ended) return std::nullopt;
    return w.status;
  }
  int reap(const MpiWorker& w) {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return w.stage == MpiWorker::Stage::ended; });
    return w.status;
  }
  std::shared_ptr<const std::string> where(const MpiWorker& w) const {
    std::lock_guard lock(mutex_);
    return w.where;
  }
  /// The Link is gone: its id is free once the worker has ended.
  void drop(MpiWorker& w) {
    std::lock_guard lock(mutex_);
    w.dropped = true;
    if (w.stage == MpiWorker::Stage::ended) forget(w);
  }

  /// What the pump is asked to send (order() takes close_sending or kill).
  struct Command {
    enum : int { start, data, close_sending, kill };
    int op;
    std::shared_ptr<MpiWorker> w;
    std::shared_ptr<const TaskBytes> frame;  // sent from where it is, or
    std::vector<char> bytes;                 // these
    int sig;
  };

 private:
  static std::uint64_t key(std::size_t peer, std::uint32_t id) { return (std::uint64_t{peer} << 32) | id; }

  /// With mutex_ held.
  void forget(MpiWorker& w) {
    workers_.erase(key(w.peer, w.id));
    peers_[w.peer].free_ids.push_back(w.id);
  }

  void wake() noexcept {
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof(one));
  }
  void wake_if_sleeping() noexcept {
    if (sleeping_.load()) wake();
  }

  // ---- opening: every rank says hello -----------------------------------------------

  void handshake(const Options& options) {
    mpi_wire::OpenMessage open;
    open.start_method = static_cast<std::uint8_t>(options.start_method);
    open.error_on_threaded_fork = options.error_on_threaded_fork ? 1 : 0;
    open.beat_ms = static_cast<std::uint32_t>(std::clamp<long long>(lost_after_.count() / 10, 10, 1000));
    const std::vector<char> bytes = open.encode();
    for (const auto& p : peers_) {
      sends_.send(comm_, p.rank, mpi_wire::tag(mpi_wire::open), bytes);
    }
    const auto answer_within = std::max<std::chrono::milliseconds>(lost_after_, std::chrono::seconds(30));
    const auto deadline = Clock::now() + answer_within;
    std::size_t waiting = peers_.size();
    std::vector<bool> said(peers_.size(), false);
    std::string problem;
    while (waiting > 0 && Clock::now() < deadline) {
      sends_.progress();
      int flag = 0;
      MPI_Message msg;
      MPI_Status status;
      MPI_Improbe(MPI_ANY_SOURCE, MPI_ANY_TAG, comm_, &flag, &msg, &status);
      if (flag == 0) {
        ::usleep(100);
        continue;
      }
      mpi_wire::Received got = mpi_wire::receive(msg, status);
      auto it = by_rank_.find(status.MPI_SOURCE);
      if (it == by_rank_.end() || mpi_wire::kind_of(status.MPI_TAG) != mpi_wire::hello || said[it->second]) continue;
      said[it->second] = true;
      --waiting;
      MpiPeer& p = peers_[it->second];
      p.heard = Clock::now();
      mpi_wire::HelloMessage hello;
      try {
        hello = mpi_wire::HelloMessage::decode(got);
      } catch (const std::exception& e) {
        problem = fmt::format("{} {} sent a hello procpool cannot read ({})", rank_name_, p.rank, e.what());
        continue;
      }
      p.host = hello.host;
      p.pid = hello.pid;
      p.cpus = std::max<std::size_t>(1, hello.cpus);
      p.where = std::make_shared<const std::string>(fmt::format("{} {} on {}", rank_name_, p.rank, p.host));
      if (hello.build != mpi_wire::build_id()) {
        problem = fmt::format(
            "{} {} on {} runs another build of the program (build id {}; rank 0 has {}). Every rank must run the "
            "same binary: build it once and start that file on every host",
            rank_name_, p.rank, p.host, hello.build, mpi_wire::build_id());
      } else if (!hello.error.empty()) {
        problem = fmt::format("{} {} on {} cannot start workers: {}", rank_name_, p.rank, p.host, hello.error);
      }
    }
    for (std::size_t k = 0; k < peers_.size(); ++k) {
      if (said[k]) continue;
      peers_[k].lost = true;
      peers_[k].where = std::make_shared<const std::string>(fmt::format("{} {}", rank_name_, peers_[k].rank));
    }
    if (problem.empty() && waiting == peers_.size()) {
      problem = fmt::format("no serving rank answered within {} s",
                            std::chrono::duration_cast<std::chrono::seconds>(answer_within).count());
    }
    if (!problem.empty()) {
      close_peers();
      if (problem.ends_with('.')) problem.pop_back();  // a rank's own error, ending a sentence
      throw Error("procpool: the MPI pool could not open: " + problem + ".");
    }
  }

  // ---- the pump ------------------------------------------------------------------------

  void pump() {
    std::vector<Command> batch;
    long idle = 0;
    auto idle_since = Clock::now();
    for (;;) {
      {
        std::lock_guard lock(mutex_);
        batch.swap(commands_);
        if (stopping_ && batch.empty()) break;
      }
      bool busy = !batch.empty();
      issue(batch);
      batch.clear();
      const std::size_t taken = take_messages();
      busy = busy || taken > 0;
      const bool sending = sends_.progress();
      // Judged only with no backlog: a pump held up (its process stopped) first reads the news.
      if (taken < mpi_wire::take_at_most) watch_heartbeats();
      if (busy) {
        idle = 0;
        idle_since = Clock::now();
      } else {
        rest(++idle, Clock::now() - idle_since, sending);
      }
    }
    close_peers();
  }

  /// Sends the commands, small data for one worker merged into one message.
  void issue(std::vector<Command>& batch) {
    std::vector<std::pair<MpiWorker*, std::vector<char>>> merged;
    auto send_merged = [&](MpiWorker* only) {
      for (auto it = merged.begin(); it != merged.end();) {
        if (only != nullptr && it->first != only) {
          ++it;
          continue;
        }
        const MpiPeer& p = peers_[it->first->peer];
        if (!p.lost) sends_.send(comm_, p.rank, mpi_wire::tag(mpi_wire::data, it->first->id), std::move(it->second));
        it = merged.erase(it);
      }
    };
    for (Command& c : batch) {
      MpiWorker& w = *c.w;
      const MpiPeer& p = peers_[w.peer];
      if (p.lost) continue;  // its workers have ended
      if (c.op == Command::data && !c.frame) {
        auto it = std::find_if(merged.begin(), merged.end(), [&](const auto& m) { return m.first == &w; });
        if (it == merged.end()) {
          merged.emplace_back(&w, std::move(c.bytes));
        } else {
          it->second.insert(it->second.end(), c.bytes.begin(), c.bytes.end());
        }
        continue;
      }
      send_merged(&w);
      switch (c.op) {
        case Command::start:
          sends_.send(comm_, p.rank, mpi_wire::tag(mpi_wire::start, w.id), {});
          break;
        case Command::data:
          sends_.post(comm_, p.rank, mpi_wire::tag(mpi_wire::data, w.id), c.frame->data(), c.frame->size(), c.frame);
          break;
        case Command::close_sending:
          sends_.send(comm_, p.rank, mpi_wire::tag(mpi_wire::close_sending, w.id), {});
          break;
        case Command::kill:
          sends_.send(comm_, p.rank, mpi_wire::tag(mpi_wire::kill, w.id),
                      mpi_wire::Writer().put(static_cast<std::int32_t>(c.sig)).take());
          break;
      }
    }
    send_merged(nullptr);
  }

  std::size_t take_messages() {
    return mpi_wire::take_waiting(comm_, MPI_ANY_SOURCE, [&](MPI_Message& msg, MPI_Status& status) {
      mpi_wire::Received bytes = mpi_wire::receive(msg, status);
      auto it = by_rank_.find(status.MPI_SOURCE);
      if (it != by_rank_.end()) handle(it->second, status.MPI_TAG, std::move(bytes));
    });
  }

  void handle(std::size_t peer, int tag, mpi_wire::Received bytes) {
    std::lock_guard lock(mutex_);
    MpiPeer& p = peers_[peer];
    p.heard = Clock::now();
    const auto kind = mpi_wire::kind_of(tag);
    if (kind == mpi_wire::closed) {
      p.closed = true;
      return;
    }
    auto found = workers_.find(key(peer, mpi_wire::id_of(tag)));
    if (found == workers_.end() || p.lost) return;
    MpiWorker& w = *found->second;
    try {
      switch (kind) {
        case mpi_wire::data:
          if (w.dropped || bytes.size == 0) return;
          w.inbound.push_back(std::move(bytes));
          if (w.inbound.size() == 1) signal(w);
          return;
        case mpi_wire::started:
          w.pid = mpi_wire::Reader(bytes).get<std::int32_t>();
          w.stage = MpiWorker::Stage::running;
          cv_.notify_all();
          return;
        case mpi_wire::start_failed: {
          mpi_wire::Reader r(bytes);
          w.refused = r.get<std::uint8_t>() != 0;
          w.failure = r.text();
          w.stage = MpiWorker::Stage::failed;
          --p.live;
          cv_.notify_all();
          return;
        }
        case mpi_wire::ended:
          end(w, mpi_wire::Reader(bytes).get<std::int32_t>());
          return;
        default:
          return;
      }
    } catch (const std::exception&) {
      // A message cut short: the rank is not one of ours.
    }
  }

  /// With mutex_ held.
  void end(MpiWorker& w, int status) {
    if (w.stage == MpiWorker::Stage::ended || w.stage == MpiWorker::Stage::failed) return;
    if (w.stage == MpiWorker::Stage::starting) {
      w.stage = MpiWorker::Stage::failed;
      w.failure = "the rank was lost";
    } else {
      w.stage = MpiWorker::Stage::ended;
      w.status = status;
    }
    --peers_[w.peer].live;
    signal(w);
    cv_.notify_all();
    if (w.dropped) forget(w);
  }
  static void signal(MpiWorker& w) noexcept {
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(w.event.get(), &one, sizeof(one));
  }

  /// A rank not heard from for lost_after is lost: its workers end as killed.
  void watch_heartbeats() {
    const auto now = Clock::now();
    std::lock_guard lock(mutex_);
    for (std::size_t k = 0; k < peers_.size(); ++k) {
      MpiPeer& p = peers_[k];
      if (p.lost || now - p.heard < lost_after_) continue;
      p.lost = true;
      p.where = std::make_shared<const std::string>(
          fmt::format("{} {} on {}, lost: no word from it for {} ms", rank_name_, p.rank, p.host, lost_after_.count()));
      std::vector<MpiWorker*> on_it;
      for (auto& [id, w] : workers_) {
        if (w->peer == k) on_it.push_back(w.get());
      }
      for (MpiWorker* w : on_it) {
        w->where = p.where;
        end(*w, wait_status_lost);  // how it ended, if it did, is not known
      }
      sends_.abandon(p.rank);
    }
  }

  /// Nothing moved: spins a little, then sleeps on the wake eventfd (MPI
  /// gives no fd to wait on) for as long as mpi_wire::rest_us says.
  void rest(long idle, Clock::duration idle_for, bool sending) {
    if (idle < 64) return;
    sleeping_.store(true);
    bool queued;
    {
      std::lock_guard lock(mutex_);
      queued = !commands_.empty() || stopping_;
    }
    if (!queued) {
      const long us = mpi_wire::rest_us(idle_for, sending);
      pollfd fd{wake_.get(), POLLIN, 0};
      const timespec timeout{0, us * 1000};
      if (::ppoll(&fd, 1, &timeout, nullptr) > 0) {
        std::uint64_t drained;
        [[maybe_unused]] auto n = ::read(wake_.get(), &drained, sizeof(drained));
      }
    }
    sleeping_.store(false);
  }

  /// Tells every rank still here that the pool ends, and waits for each to
  /// answer (what it sent before is then all received and dropped).
  void close_peers() {
    // Lost ranks too: one that was only slow stops its workers.
    for (auto& p : peers_) sends_.send(comm_, p.rank, mpi_wire::tag(mpi_wire::close), {});
    const auto deadline = Clock::now() + lost_after_;
    for (;;) {
      bool all = true;
      {
        std::lock_guard lock(mutex_);
        for (auto& p : peers_) all = all && (p.lost || p.closed);
      }
      if (all || Clock::now() >= deadline) break;
      if (take_messages() == 0) ::usleep(100);
      sends_.progress();
    }
    std::lock_guard lock(mutex_);
    for (auto& p : peers_) {
      if (!p.lost && !p.closed) p.lost = true;  // never answered: not to be trusted again
      if (p.lost) sends_.abandon(p.rank);
    }
    // The others answered, so they have what was sent before.
    const auto drained = Clock::now() + lost_after_;
    while (sends_.progress() && Clock::now() < drained) ::usleep(100);
  }

  MPI_Comm comm_;
  const std::chrono::milliseconds lost_after_;
  const std::uint32_t max_ids_;
  const std::string rank_name_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<MpiPeer> peers_;
  std::map<int, std::size_t> by_rank_;
  std::map<std::uint64_t, std::shared_ptr<MpiWorker>> workers_;
  std::vector<Command> commands_;
  bool stopping_ = false;
  Fd wake_;
  std::atomic<bool> sleeping_{false};
  mpi_wire::Sends sends_;  // the pump's, or the opening thread's before it
  InternalThread pump_;
};

}  // namespace procpool::detail

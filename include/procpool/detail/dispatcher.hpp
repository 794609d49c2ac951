// procpool - the dispatcher: owns the workers and one I/O thread that
// sends tasks, reads results, notices deaths and replaces workers.
//
// Invariant: every chunk handed to submit() is delivered to its job exactly
// once, as results or as a failure, whatever happens to the workers or the
// pool. That is what keeps every wait in the library from hanging.
#pragma once

#include <sys/eventfd.h>
#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>

#include "../errors.hpp"
#include "../options.hpp"
#include "frame.hpp"
#include "job.hpp"
#include "launcher.hpp"
#include "system.hpp"
#include "worker.hpp"

namespace procpool::detail {

/// One task on its way to a worker: a serialized task frame and where its
/// outcome goes.
struct Chunk {
  std::shared_ptr<JobState> job;
  std::uint64_t index = 0;  // the chunk's number within its job
  std::vector<char> frame;  // a task frame; the dispatcher stamps the task id
};

class Dispatcher {
 public:
  Dispatcher(const Options& options, std::unique_ptr<Launcher> launcher)
      : launcher_(std::move(launcher)),
        processes_(options.processes),
        max_tasks_per_child_(options.maxtasksperchild),
        max_in_flight_(std::max<std::size_t>(1, options.max_tasks_in_flight)),
        max_message_(std::min<std::size_t>(options.max_message_bytes, 0xffffffffu)),
        init_id_(InitializerAccess::id(options.initializer)),
        init_state_(InitializerAccess::state(options.initializer)),
        slots_(options.processes) {
    int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd == -1) throw_errno("eventfd");
    wake_ = Fd(fd);
    // The I/O thread blocks every signal: they belong to the program's own
    // threads, and a write to a dead worker's pipe then fails with EPIPE
    // instead of killing the process with SIGPIPE.
    sigset_t all, old;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &old);
    try {
      thread_ = std::thread([this] { io_loop(); });
    } catch (...) {
      ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
      throw;
    }
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  }

  Dispatcher(const Dispatcher&) = delete;
  Dispatcher& operator=(const Dispatcher&) = delete;
  ~Dispatcher() { terminate(); }

  std::size_t processes() const { return processes_; }

  /// Queues chunks; they are failed at once if the pool can no longer run them.
  void submit(std::vector<Chunk> chunks) {
    std::vector<Delivery> failed;
    {
      std::lock_guard lock(mutex_);
      if (state_ != State::running) {
        throw PoolNotRunning("procpool: the pool is closed or terminated; it accepts no new work");
      }
      for (auto& chunk : chunks) {
        if (broken_) {
          failed.push_back({std::move(chunk.job), chunk.index, failure_outcome(*broken_)});
        } else if (chunk.frame.size() - frame_header_size > max_message_) {
          failed.push_back({std::move(chunk.job), chunk.index,
                            failure_outcome({ChunkFailure::Kind::protocol, 0, 0, 0,
                                             fmt::format("its task message ({} bytes) is larger than "
                                                         "Options::max_message_bytes ({})",
                                                         chunk.frame.size(), max_message_)})});
        } else {
          pending_.push_back(std::move(chunk));
        }
      }
    }
    for (auto& d : failed) d.job->deliver(d.chunk, std::move(d.outcome));
    wake();
  }

  /// No more submissions; queued work still runs.
  void close() {
    {
      std::lock_guard lock(mutex_);
      if (state_ == State::running) state_ = State::closed;
    }
    wake();
  }

  /// After close(): waits for all queued work, then for every worker to exit.
  void join() {
    {
      std::lock_guard lock(mutex_);
      if (state_ == State::running) {
        throw PoolNotRunning("procpool: join() called on a running pool; call close() or terminate() first");
      }
    }
    std::lock_guard join_lock(join_mutex_);
    if (thread_.joinable()) thread_.join();
  }

  /// Stops the workers now (SIGTERM, then SIGKILL after a short grace) and
  /// fails every unfinished task. Never throws, never hangs.
  void terminate() noexcept {
    {
      std::lock_guard lock(mutex_);
      if (state_ != State::stopped) state_ = State::terminating;
    }
    wake();
    std::lock_guard join_lock(join_mutex_);
    if (thread_.joinable()) thread_.join();
    stop_workers();
  }

 private:
  enum class State { running, closed, terminating, stopped };

  struct Delivery {
    std::shared_ptr<JobState> job;
    std::uint64_t chunk;
    ChunkOutcome outcome;
  };

  struct InFlight {
    std::shared_ptr<JobState> job;
    std::uint64_t chunk;
  };

  struct Slot {
    LaunchedWorker proc;
    bool live = false;      // a process occupies this slot
    bool ready = false;     // it finished its initializer
    bool exited = false;    // its pidfd fired or its result pipe hit EOF
    std::deque<std::uint64_t> held;  // task ids sent and not answered, in order
    std::size_t sent = 0;
    std::deque<std::vector<char>> outbox;
    std::size_t out_offset = 0;  // bytes of outbox.front() already written
    std::vector<char> inbox;
    std::size_t in_begin = 0, in_end = 0;
    std::optional<ChunkFailure> failure;  // why its tasks fail, if not a plain death
    std::optional<int> status;            // wait status, once reaped
  };

  static ChunkOutcome failure_outcome(ChunkFailure failure) {
    ChunkOutcome outcome;
    outcome.failure = std::move(failure);
    return outcome;
  }

  void wake() {
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof(one));
  }

  // ---- the I/O thread -------------------------------------------------------

  void io_loop() {
    std::vector<pollfd> fds;
    std::vector<std::pair<std::size_t, int>> owners;  // (slot, 0=result 1=task 2=pidfd)
    std::vector<Delivery> deliveries;
    std::unique_lock lock(mutex_);
    for (;;) {
      if (state_ == State::terminating) break;
      maintain(deliveries);
      if (state_ == State::closed && pending_.empty() && in_flight_.empty() && no_live_slots()) break;

      fds.clear();
      owners.clear();
      fds.push_back({wake_.get(), POLLIN, 0});
      owners.push_back({0, -1});
      bool need_timeout = false;
      for (std::size_t i = 0; i < slots_.size(); ++i) {
        Slot& s = slots_[i];
        if (!s.live) continue;
        if (!s.exited && s.proc.result) {
          fds.push_back({s.proc.result.get(), POLLIN, 0});
          owners.push_back({i, 0});
        }
        if (!s.outbox.empty() && s.proc.task) {
          fds.push_back({s.proc.task.get(), POLLOUT, 0});
          owners.push_back({i, 1});
        }
        if (s.proc.pidfd) {
          fds.push_back({s.proc.pidfd.get(), POLLIN, 0});
          owners.push_back({i, 2});
        } else {
          need_timeout = true;
        }
      }
      lock.unlock();
      for (auto& d : deliveries) d.job->deliver(d.chunk, std::move(d.outcome));
      deliveries.clear();
      int ready = retry_eintr([&] { return ::poll(fds.data(), fds.size(), need_timeout ? 50 : -1); });
      lock.lock();
      if (ready < 0) continue;
      if (fds[0].revents != 0) {
        std::uint64_t drained;
        [[maybe_unused]] auto n = ::read(wake_.get(), &drained, sizeof(drained));
      }
      for (std::size_t k = 1; k < fds.size(); ++k) {
        if (fds[k].revents == 0) continue;
        auto [i, what] = owners[k];
        Slot& s = slots_[i];
        if (!s.live) continue;
        if (what == 0) {
          if (!read_results(i, deliveries)) s.exited = true;
        } else if (what == 1) {
          flush_outbox(s);
        } else {
          s.exited = true;
        }
      }
      if (need_timeout) {
        for (auto& s : slots_) {
          if (!s.live || s.proc.pidfd || s.exited) continue;
          s.status = launcher_->try_reap(s.proc);
          if (s.status) s.exited = true;
        }
      }
    }
    lock.unlock();
    for (auto& d : deliveries) d.job->deliver(d.chunk, std::move(d.outcome));
  }

  /// Bookkeeping after any event: bury the dead, start replacements, hand out
  /// work, and let workers go when the pool is closing. Called with mutex_ held.
  void maintain(std::vector<Delivery>& deliveries) {
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      if (slots_[i].live && slots_[i].exited) bury(i, deliveries);
    }
    if (broken_) fail_all_pending(*broken_, deliveries);
    bool work_left = !pending_.empty();
    bool want_workers = !broken_ && (state_ == State::running || (state_ == State::closed && work_left));
    if (want_workers) {
      for (std::size_t i = 0; i < slots_.size(); ++i) {
        if (!slots_[i].live) start_worker(i, deliveries);
        if (broken_) break;
      }
    }
    if (broken_) fail_all_pending(*broken_, deliveries);
    assign_pending();
    for (auto& s : slots_) {
      if (s.live && !s.outbox.empty()) flush_outbox(s);
    }
    if (state_ == State::closed && pending_.empty()) {
      // Closing the task pipe is how a worker learns to exit.
      for (auto& s : slots_) {
        if (s.live && s.held.empty() && s.outbox.empty()) s.proc.task.reset();
      }
    }
  }

  bool no_live_slots() const {
    return std::none_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.live; });
  }

  void start_worker(std::size_t i, std::vector<Delivery>& deliveries) {
    Slot& s = slots_[i];
    try {
      s = Slot{};
      s.proc = launcher_->launch();
    } catch (const std::exception& e) {
      s = Slot{};
      broken_ = ChunkFailure{ChunkFailure::Kind::start_failed, 0, i, 0,
                             fmt::format("the pool could not start worker {}: {}", i, e.what())};
      fail_all_pending(*broken_, deliveries);
      return;
    }
    s.live = true;
    set_nonblocking(s.proc.task.get());
    set_nonblocking(s.proc.result.get());
    std::vector<char> config;
    std::size_t start = begin_frame(config, FrameKind::config);
    put<std::uint64_t>(config, i);
    put<std::uint64_t>(config, max_tasks_per_child_);
    put<std::uint64_t>(config, init_id_);
    put<std::uint64_t>(config, max_message_);
    config.insert(config.end(), init_state_.begin(), init_state_.end());
    finish_frame(config, start);
    s.outbox.push_back(std::move(config));
    ++workers_started_;
  }

  /// A worker has exited: collect what it still sent, reap it, fail what it held.
  void bury(std::size_t i, std::vector<Delivery>& deliveries) {
    Slot& s = slots_[i];
    if (s.proc.result) read_results(i, deliveries);  // what it sent before dying still counts
    int status = s.status ? *s.status : launcher_->reap(s.proc);
    ChunkFailure lost = s.failure.value_or(ChunkFailure{ChunkFailure::Kind::worker_lost, s.proc.pid, i, status, {}});
    lost.wait_status = status;
    if (!s.ready && !broken_) {
      if (WIFEXITED(status) && WEXITSTATUS(status) == exit_initializer_failed && init_failure_) {
        broken_ = *init_failure_;
      } else if (++early_deaths_ > 3 * slots_.size() + 3) {
        broken_ = ChunkFailure{ChunkFailure::Kind::start_failed, s.proc.pid, i, status,
                               fmt::format("workers keep dying before they are ready (the last one, pid {}, {}); "
                                           "the pool stopped replacing them",
                                           s.proc.pid, describe_wait_status(status))};
      }
    }
    if (s.ready) early_deaths_ = 0;
    for (std::uint64_t id : s.held) {
      auto it = in_flight_.find(id);
      if (it == in_flight_.end()) continue;
      deliveries.push_back({std::move(it->second.job), it->second.chunk, failure_outcome(lost)});
      in_flight_.erase(it);
    }
    s = Slot{};
  }

  void fail_all_pending(const ChunkFailure& failure, std::vector<Delivery>& deliveries) {
    for (auto& chunk : pending_) deliveries.push_back({std::move(chunk.job), chunk.index, failure_outcome(failure)});
    pending_.clear();
  }

  /// Tasks each worker may hold: one while tasks are long (so none waits
  /// behind another on a busy worker), more while they are short.
  std::size_t window() const {
    if (!have_timing_ || task_ns_ > 1'000'000.0) return 1;
    return max_in_flight_;
  }

  void assign_pending() {
    const std::size_t limit = window();
    while (!pending_.empty()) {
      Chunk& chunk = pending_.front();
      if (chunk.job->cancelled()) {
        pending_.pop_front();
        continue;
      }
      Slot* best = nullptr;
      for (auto& s : slots_) {
        if (!s.live || s.exited || !s.proc.task || s.failure) continue;
        if (max_tasks_per_child_ != 0 && s.sent >= max_tasks_per_child_) continue;
        if (s.held.size() >= limit) continue;
        if (best == nullptr || s.held.size() < best->held.size()) best = &s;
      }
      if (best == nullptr) return;
      std::uint64_t id = next_task_id_++;
      patch<std::uint64_t>(chunk.frame, task_id_offset, id);
      in_flight_.emplace(id, InFlight{std::move(chunk.job), chunk.index});
      best->held.push_back(id);
      ++best->sent;
      best->outbox.push_back(std::move(chunk.frame));
      pending_.pop_front();
    }
  }

  void flush_outbox(Slot& s) {
    while (!s.outbox.empty() && s.proc.task) {
      iovec iov[64];
      int n = 0;
      for (auto it = s.outbox.begin(); it != s.outbox.end() && n < 64; ++it, ++n) {
        std::size_t skip = (n == 0) ? s.out_offset : 0;
        iov[n] = {it->data() + skip, it->size() - skip};
      }
      ssize_t written = retry_eintr([&] { return ::writev(s.proc.task.get(), iov, n); });
      if (written < 0) {
        if (errno == EAGAIN) return;
        // EPIPE: the worker is gone; its death is noticed through its pidfd/EOF.
        s.outbox.clear();
        s.out_offset = 0;
        return;
      }
      auto left = static_cast<std::size_t>(written);
      while (left > 0) {
        std::size_t rest = s.outbox.front().size() - s.out_offset;
        if (left >= rest) {
          left -= rest;
          s.outbox.pop_front();
          s.out_offset = 0;
        } else {
          s.out_offset += left;
          left = 0;
        }
      }
    }
  }

  /// Reads what the worker sent; returns false at EOF.
  bool read_results(std::size_t i, std::vector<Delivery>& deliveries) {
    Slot& s = slots_[i];
    for (;;) {
      if (s.in_begin == s.in_end) s.in_begin = s.in_end = 0;
      if (s.inbox.size() - s.in_end < 65536) {
        if (s.in_begin > 0) {
          std::memmove(s.inbox.data(), s.inbox.data() + s.in_begin, s.in_end - s.in_begin);
          s.in_end -= s.in_begin;
          s.in_begin = 0;
        }
        std::size_t want = s.in_end + 65536;
        if (s.in_end >= frame_header_size) {
          std::size_t whole = frame_header_size + std::min<std::size_t>(get<std::uint32_t>(s.inbox.data()), max_message_);
          want = std::max(want, whole);
        }
        if (s.inbox.size() < want) s.inbox.resize(want);
      }
      ssize_t n = retry_eintr([&] { return ::read(s.proc.result.get(), s.inbox.data() + s.in_end, s.inbox.size() - s.in_end); });
      if (n == 0) return false;
      if (n < 0) return errno == EAGAIN;
      s.in_end += static_cast<std::size_t>(n);
      if (!parse_results(i, deliveries)) return false;
    }
  }

  /// Handles every complete frame in the slot's inbox; false if the worker
  /// broke the protocol (it is then killed and buried).
  bool parse_results(std::size_t i, std::vector<Delivery>& deliveries) {
    Slot& s = slots_[i];
    for (;;) {
      FrameView frame{};
      Parse parsed = parse_frame(s.inbox.data() + s.in_begin, s.in_end - s.in_begin, max_message_, frame);
      if (parsed == Parse::need_more) return true;
      if (parsed == Parse::too_large) {
        return protocol_violation(i, fmt::format("the worker sent a message of {} bytes, over Options::max_message_bytes ({})",
                                                 get<std::uint32_t>(s.inbox.data() + s.in_begin), max_message_));
      }
      s.in_begin += frame_header_size + frame.size;
      switch (frame.kind) {
        case FrameKind::ready:
          s.ready = true;
          break;
        case FrameKind::result: {
          if (frame.size < result_prefix_size) return protocol_violation(i, "the worker sent a truncated result");
          auto id = get<std::uint64_t>(frame.data);
          auto ns = get<std::uint64_t>(frame.data + 8);
          auto held = std::find(s.held.begin(), s.held.end(), id);
          auto it = in_flight_.find(id);
          if (held == s.held.end() || it == in_flight_.end()) {
            return protocol_violation(i, "the worker answered a task it was not given");
          }
          s.held.erase(held);
          record_timing(ns);
          ChunkOutcome outcome;
          outcome.payload.assign(frame.data + result_prefix_size, frame.data + frame.size);
          outcome.pid = s.proc.pid;
          outcome.worker = i;
          deliveries.push_back({std::move(it->second.job), it->second.chunk, std::move(outcome)});
          in_flight_.erase(it);
          break;
        }
        case FrameKind::init_failed:
        case FrameKind::fatal: {
          std::string type, message;
          try {
            Decoder decoder(frame.data, frame.size);
            decoder(type, message);
          } catch (...) {
            type = "unknown";
          }
          ChunkFailure failure{frame.kind == FrameKind::init_failed ? ChunkFailure::Kind::initializer
                                                                     : ChunkFailure::Kind::protocol,
                               s.proc.pid, i, 0, fmt::format("{}: {}", type, message)};
          if (frame.kind == FrameKind::init_failed) init_failure_ = failure;
          s.failure = failure;
          break;
        }
        default:
          return protocol_violation(i, fmt::format("the worker sent an unknown message kind {}",
                                                   static_cast<std::uint32_t>(frame.kind)));
      }
    }
  }

  bool protocol_violation(std::size_t i, std::string why) {
    Slot& s = slots_[i];
    s.failure = ChunkFailure{ChunkFailure::Kind::protocol, s.proc.pid, i, 0, std::move(why)};
    launcher_->kill(s.proc, SIGKILL);
    s.proc.result.reset();
    s.in_begin = s.in_end = 0;
    return false;
  }

  void record_timing(std::uint64_t ns) {
    constexpr double alpha = 0.2;
    task_ns_ = have_timing_ ? (1 - alpha) * task_ns_ + alpha * static_cast<double>(ns) : static_cast<double>(ns);
    have_timing_ = true;
  }

  /// After the I/O thread is gone: stop every worker, fail every unfinished task.
  void stop_workers() noexcept {
    std::vector<Delivery> deliveries;
    {
      std::lock_guard lock(mutex_);
      if (state_ == State::stopped) return;
      state_ = State::stopped;
      ChunkFailure terminated{ChunkFailure::Kind::terminated, 0, 0, 0, {}};
      fail_all_pending(terminated, deliveries);
      for (auto& [id, flight] : in_flight_) {
        deliveries.push_back({std::move(flight.job), flight.chunk, failure_outcome(terminated)});
      }
      in_flight_.clear();
      for (auto& s : slots_) {
        if (!s.live) continue;
        s.proc.task.reset();  // an idle worker exits on EOF at once
        launcher_->kill(s.proc, SIGTERM);
      }
      // A short grace for SIGTERM, then SIGKILL; a pidfd (or waitpid) says when each is gone.
      auto deadline = Clock::now() + std::chrono::milliseconds(200);
      for (auto& s : slots_) {
        if (!s.live) continue;
        for (;;) {
          if (launcher_->try_reap(s.proc)) {
            s = Slot{};
            break;
          }
          auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
          if (left <= 0) break;
          if (s.proc.pidfd) {
            pollfd p{s.proc.pidfd.get(), POLLIN, 0};
            ::poll(&p, 1, static_cast<int>(std::min<long>(left, 10)));
          } else {
            ::usleep(1000);
          }
        }
      }
      for (auto& s : slots_) {
        if (!s.live) continue;
        launcher_->kill(s.proc, SIGKILL);
        launcher_->reap(s.proc);
        s = Slot{};
      }
    }
    for (auto& d : deliveries) d.job->deliver(d.chunk, std::move(d.outcome));
  }

  std::unique_ptr<Launcher> launcher_;
  const std::size_t processes_;
  const std::size_t max_tasks_per_child_;
  const std::size_t max_in_flight_;
  const std::size_t max_message_;
  const std::uint64_t init_id_;
  const std::vector<char> init_state_;

  std::mutex mutex_;
  std::mutex join_mutex_;
  State state_ = State::running;
  std::vector<Slot> slots_;
  std::deque<Chunk> pending_;
  std::unordered_map<std::uint64_t, InFlight> in_flight_;
  std::optional<ChunkFailure> broken_;
  std::optional<ChunkFailure> init_failure_;
  std::size_t early_deaths_ = 0;
  std::uint64_t next_task_id_ = 1;
  std::uint64_t workers_started_ = 0;
  double task_ns_ = 0;
  bool have_timing_ = false;
  Fd wake_;
  std::thread thread_;
};

}  // namespace procpool::detail

// procpool - the dispatcher: owns the workers and one I/O thread that
// sends tasks, reads results, notices deaths and replaces workers.
//
// Invariant: every chunk handed to submit() is delivered to its job exactly
// once, as results or as a failure, whatever happens to the workers or the
// pool. That is what keeps every wait in the library from hanging.
//
// Its parts: worker_state.hpp (what it knows of each worker), scheduler.hpp
// (which worker runs what), result_reader.hpp (what workers send),
// dispatcher_workers.hpp (starting, burying and stopping workers) and link.hpp
// (the transport seam). This file holds the API the pool calls and the loop.
#pragma once

#include <sys/eventfd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "../errors.hpp"
#include "../options.hpp"
#include "callback_runner.hpp"
#include "claims.hpp"
#include "config.hpp"
#include "engine.hpp"
#include "job.hpp"
#include "link.hpp"
#include "output_relay.hpp"
#include "protocol.hpp"
#include "result_reader.hpp"
#include "ring.hpp"
#include "scheduler.hpp"
#include "shm.hpp"
#include "system.hpp"
#include "thread.hpp"
#include "worker_state.hpp"

namespace procpool::detail {

class Dispatcher final : public Engine, public std::enable_shared_from_this<Dispatcher> {
 public:
  Dispatcher(const Options& options, std::unique_ptr<Transport> transport);

  /// Called once the pool owns this dispatcher: a fork pool made before
  /// procpool::init starts its workers in init (DeferredStarts).
  static void defer_start(const std::shared_ptr<Dispatcher>& self);

  Dispatcher(const Dispatcher&) = delete;
  Dispatcher& operator=(const Dispatcher&) = delete;
  ~Dispatcher() override;

  /// procpool::init has run: a pool that waited for it starts its workers.
  void start_deferred();

  // The Engine (engine.hpp), which documents each.
  void shutdown() noexcept override;
  std::size_t processes() const override { return processes_; }
  bool forked_copy() const noexcept override { return !owner_.here(); }
  void require_owner() const override { owner_.require(); }
  TaskBytes new_frame() const override { return TaskBytes(TaskAllocator<char>(task_memory_)); }
  std::size_t max_tasks_per_worker() const override { return max_in_flight_; }
  void open_stream() override;
  void close_stream() noexcept override;
  bool terminated() const noexcept override { return terminated_.load(std::memory_order_relaxed); }
  void require_running() override;
  void submit_from(std::vector<Chunk>& chunks, bool in_stream) override;
  void close() override;
  void join() override;
  void terminate() noexcept override;

  // The JobHost (job.hpp).
  std::size_t withdraw(const JobState& job) override;
  bool post_callback(std::function<void()> work) override;

 private:
  enum class State { running, closed, terminating, stopped };

  [[noreturn]] static void throw_not_running() {
    throw PoolNotRunning("procpool: the pool is closed or terminated; it accepts no new work");
  }

  /// Hands each job all its outcomes at once, in the order they came (one
  /// lock and at most one wake-up per job), outside the dispatcher's lock;
  /// empties `deliveries`. A job with callbacks gets them on the callback
  /// thread, which runs its callbacks.
  void deliver_all(std::vector<Delivery>& deliveries) {
    for (auto run = deliveries.begin(); run != deliveries.end();) {
      const JobState* job = run->job.get();
      auto end = std::stable_partition(run, deliveries.end(), [&](const Delivery& d) { return d.job.get() == job; });
      if (job->gated()) {
        // Shared: std::function needs a copyable callable, and outcomes only move.
        auto batch =
            std::make_shared<std::vector<Delivery>>(std::make_move_iterator(run), std::make_move_iterator(end));
        try {
          runner_.post([batch] { batch->front().job->deliver(batch->begin(), batch->end()); });
        } catch (const std::exception&) {
          // No thread to be had: the callbacks run here rather than never.
          batch->front().job->deliver(batch->begin(), batch->end());
        }
      } else {
        run->job->deliver(run, end);
      }
      run = end;
    }
    deliveries.clear();
  }

  void wake() {
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof(one));
  }

  // ---- the I/O thread -------------------------------------------------------

  /// What poll() watches: the wake-up eventfd, then each worker's fds.
  struct Watch {
    enum Role { results, tasks, end };
    std::vector<pollfd> fds;
    std::vector<std::pair<Worker*, Role>> owners;
    bool poll_for_ends = false;  // some worker has no end_fd: look for its end by try_reap() now and then

    void add(int fd, short events, Worker* w, Role role) {
      fds.push_back({fd, events, 0});
      owners.push_back({w, role});
    }
  };

  /// Waits (10 s at most) until the I/O thread has started the first
  /// workers, or failed to.
  void wait_first_round() {
    std::unique_lock lock(mutex_);
    first_round_cv_.wait_for(lock, std::chrono::seconds(10), [this] { return first_round_done_; });
  }

  void io_loop() {
    Watch watch;
    std::vector<Delivery> deliveries;
    std::unique_lock lock(mutex_);
    for (;;) {
      if (state_ == State::terminating) break;
      maintain(lock, deliveries);
      if (!first_round_done_ && !start_at_init_) {
        first_round_done_ = true;
        first_round_cv_.notify_all();
      }
      if (state_ == State::terminating) break;
      // With no workers, no task is held.
      if (state_ == State::closed && streams_ == 0 && pending_.empty() && workers_.empty()) break;
      const int timeout_ms = prepare_watch(watch);
      lock.unlock();
      deliver_all(deliveries);
      const int ready = retry_eintr([&] { return ::poll(watch.fds.data(), watch.fds.size(), timeout_ms); });
      // Unmapping idle buffers takes no lock of ours: TaskMemory has its own.
      if (!task_memory_->empty()) {
        const auto now = Clock::now();
        if (now >= next_trim_) {
          task_memory_->trim(now - ShmWriter::keep_idle_for);
          next_trim_ = now + std::chrono::milliseconds(500);
        }
      }
      lock.lock();
      if (ready >= 0) handle_events(watch, deliveries);
    }
    const bool terminating = state_ == State::terminating;
    first_round_done_ = true;  // or nobody would stop waiting for it
    first_round_cv_.notify_all();
    lock.unlock();
    deliver_all(deliveries);
    if (terminating) stop_workers();
    // Every worker is gone: so is the fork server, which reaps its last workers before it exits.
    // Here, on the thread that started it: its parent-death signal fires when this thread ends.
    transport_->shutdown();
  }

  /// Fills `watch` with what to wait for; returns poll()'s timeout.
  int prepare_watch(Watch& watch) {
    watch.fds.clear();
    watch.owners.clear();
    watch.add(wake_.get(), POLLIN, nullptr, Watch::end);
    watch.poll_for_ends = false;
    // Tasks left unread by a stopped worker go to an idle one.
    auto next_deadline = broken_ ? std::nullopt : scheduler_.take_back_unread(pending_, workers_, Clock::now());
    if (auto timeouts = enforce_timeouts())
      next_deadline = next_deadline ? std::min(*next_deadline, *timeouts) : timeouts;
    if (start_failure_ && !broken_ && wants_workers()) {
      next_deadline = next_deadline ? std::min(*next_deadline, next_start_) : next_start_;
    }
    for (auto& w : workers_) {
      Link& link = *w->link;
      if (!w->eof) watch.add(link.receive_fd(), POLLIN, w.get(), Watch::results);
      if (link.has_unsent() && link.sending()) watch.add(link.send_fd(), POLLOUT, w.get(), Watch::tasks);
      if (link.end_fd() >= 0) {
        watch.add(link.end_fd(), POLLIN, w.get(), Watch::end);
      } else {
        watch.poll_for_ends = true;
      }
    }
    int timeout_ms = watch.poll_for_ends ? 50 : -1;
    // Idle shared buffers are let go of after a while, busy or not.
    if (!task_memory_->empty()) timeout_ms = timeout_ms < 0 ? 1000 : std::min(timeout_ms, 1000);
    if (next_deadline) {
      auto until = std::chrono::ceil<std::chrono::milliseconds>(*next_deadline - Clock::now()).count();
      int ms = static_cast<int>(std::clamp<long long>(until, 0, 60'000));
      timeout_ms = timeout_ms < 0 ? ms : std::min(timeout_ms, ms);
    }
    return timeout_ms;
  }

  /// Acts on what poll() reported. With mutex_ held.
  void handle_events(Watch& watch, std::vector<Delivery>& deliveries) {
    if (watch.fds[0].revents != 0) {
      std::uint64_t drained;
      [[maybe_unused]] auto n = ::read(wake_.get(), &drained, sizeof(drained));
    }
    for (std::size_t k = 1; k < watch.fds.size(); ++k) {
      if (watch.fds[k].revents == 0) continue;
      auto [w, role] = watch.owners[k];
      if (role == Watch::results) {
        // A hang-up: the worker is gone or going; read to the end, so it is taken for that before any refill.
        const bool hung_up = (watch.fds[k].revents & (POLLHUP | POLLERR)) != 0;
        if (!reader_.read(*w, deliveries, hung_up)) w->eof = true;
        // Refill it at once: its next tasks leave before the other
        // workers' results are read and before this one's are delivered.
        if (!broken_ && w->takes_tasks()) {
          scheduler_.assign(pending_, workers_);
          scheduler_.rebalance(pending_, workers_);
          if (w->link->has_unsent()) w->link->flush();
        }
      } else if (role == Watch::tasks) {
        w->link->flush();
      } else {
        w->exited = true;
      }
    }
    if (watch.poll_for_ends) {
      // No end_fd (no pidfd on this kernel): look for ended workers by try_reap().
      for (auto& w : workers_) {
        if (w->link->end_fd() >= 0 || w->exited) continue;
        w->status = w->link->try_reap();
        if (w->status) w->exited = true;
      }
    }
  }

  /// Bookkeeping after any event: bury the dead, start replacements, hand out
  /// work, and let workers go when the pool is closing. Called with `lock`
  /// held, which it lets go of while it starts workers.
  void maintain(std::unique_lock<std::mutex>& lock, std::vector<Delivery>& deliveries) {
    for (std::size_t i = 0; i < workers_.size();) {
      if (workers_[i]->exited) {
        bury(*workers_[i], deliveries);
        workers_.erase(workers_.begin() + static_cast<std::ptrdiff_t>(i));
        // What it held (fds, a process) is free: a failed start is tried again now, afresh.
        if (start_failure_) retry_starts_now();
      } else {
        ++i;
      }
    }
    // Two rounds: a worker sent its last task in the first round gets its
    // replacement in the second, so the replacement starts while it works.
    for (int round = 0; round < 2; ++round) {
      start_missing_workers(lock);
      if (broken_) fail_all_pending(*broken_, deliveries);
      // Tasks no worker can take while workers cannot be started fail, with
      // the reason. Not at once while a worker is left (one finishing its
      // last task frees its fds and process when it exits) or the output
      // relay holds an ended one's pipes. The pool goes on trying.
      if (start_failure_ && start_failures_ >= 2 && !pending_.empty() && !any_worker_will_take_tasks() &&
          ((workers_.empty() && !relay_holds_ended()) || start_backoff_ >= max_start_backoff)) {
        fail_all_pending(*start_failure_, deliveries);
      }
      scheduler_.assign(pending_, workers_);
    }
    if (!broken_) scheduler_.rebalance(pending_, workers_);
    const bool winding_down = state_ == State::closed && streams_ == 0 && pending_.empty();
    for (auto& w : workers_) {
      Link& link = *w->link;
      if (link.has_unsent()) link.flush();
      if (!w->held.empty() || link.has_unsent()) continue;
      // A retiring worker whose last tasks were taken back elsewhere (or ran) has nothing more
      // to do; nor has any once the pool winds down. Closing its task channel ends it.
      if (w->retiring || winding_down) link.close_sending();
    }
  }

  /// Whether some worker takes tasks now or will once it is ready.
  bool any_worker_will_take_tasks() const {
    return std::any_of(workers_.begin(), workers_.end(), [](const auto& w) { return w->takes_tasks(); });
  }

  /// Whether the pool needs workers: it runs, or it is closed with work left.
  bool wants_workers() const {
    return state_ == State::running || (state_ == State::closed && (streams_ > 0 || !pending_.empty()));
  }

  void fail_all_pending(const ChunkFailure& failure, std::vector<Delivery>& deliveries) {
    for (auto& task : pending_) {
      deliveries.push_back({std::move(task.job), task.chunk, failure_outcome(failure), task.items()});
    }
    pending_.clear();
  }

  // Starting, burying and stopping workers: dispatcher_workers.hpp.
  void start_missing_workers(std::unique_lock<std::mutex>& lock);
  bool relay_holds_ended() const;
  void retry_starts_now();
  std::unique_ptr<Worker> start_worker(std::size_t slot);
  static void warn_forked_at_first_call();
  void start_failed(std::size_t slot, const std::exception& e);
  void bury(Worker& w, std::vector<Delivery>& deliveries);
  void judge_early_death(Worker& w, int status);
  std::optional<Clock::time_point> enforce_timeouts();
  void stop_workers() noexcept;

  /// How long a worker may stop in the middle of a message before it is
  /// taken for broken.
  static constexpr std::chrono::seconds stall_limit{5};
  /// Between SIGTERM and SIGKILL for a task over its timeout.
  static constexpr std::chrono::milliseconds kill_grace{200};

  std::unique_ptr<Transport> transport_;
  const std::size_t processes_;
  const std::size_t max_tasks_per_child_;
  const std::size_t max_in_flight_;
  const std::size_t retries_;
  const std::chrono::milliseconds task_timeout_;
  bool timeouts_used_ = task_timeout_.count() > 0;  // some task has a timeout: Options' or its call's
  const std::size_t max_rss_;
  const std::size_t address_space_limit_;
  const std::size_t max_message_;
  // The tasks' buffers, shared with the frames that live in them (TaskBytes);
  // before the tasks, which lease them.
  std::shared_ptr<TaskMemory> task_memory_;
  const std::size_t shm_threshold_;  // 0: no shared memory (none asked for, none to be had, or a remote transport)
  const std::uint64_t init_id_;
  const std::vector<char> init_state_;
  const SharedStates init_shares_;  // the SharedMemory blocks init_state_ refers to
  Scheduler scheduler_;
  ResultReader reader_;

  std::mutex mutex_;
  std::mutex join_mutex_;
  std::atomic<bool> terminated_{false};
  const OwnerProcess owner_;  // the process the pool belongs to (forked_copy)
  State state_ = State::running;
  std::size_t streams_ = 0;  // calls still submitting their batches (open_stream)
  Workers workers_;
  Ring<Task> pending_;
  std::optional<ChunkFailure> broken_;
  std::size_t early_deaths_ = 0;
  bool first_start_ = true;                    // no worker started yet
  bool first_round_done_ = false;              // the first workers were started (or failed to)
  std::condition_variable first_round_cv_;     // for the constructor of a fork pool
  bool deferred_ = false;                      // a fork pool made before procpool::init (set once)
  bool start_at_init_ = false;                 // the same, not started yet (under mutex_)
  std::optional<ChunkFailure> start_failure_;  // the last start failed: why (cleared by the next that works)
  std::size_t start_failures_ = 0;             // failed starts in a row
  Clock::time_point next_start_{};             // when to try again after a failed start
  std::chrono::milliseconds start_backoff_{0};
  // The longest wait between two starts; reached after about 6 s of failures.
  static constexpr std::chrono::milliseconds max_start_backoff{5000};
  Clock::time_point next_trim_{};  // when to look for idle shared buffers again
  Fd wake_;
  std::unique_ptr<OutputRelay> relay_;  // only when workers' output is not inherited
  CallbackRunner runner_;               // before the I/O thread, which posts to it
  InternalThread thread_;
};

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
#include "dispatcher_api.hpp"
#include "dispatcher_workers.hpp"
#endif

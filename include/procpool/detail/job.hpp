// procpool - one call's mailbox (map, imap, apply_async...): the dispatcher
// delivers each chunk's outcome exactly once, the caller takes and decodes it.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "../call_options.hpp"
#include "../errors.hpp"
#include "callback_runner.hpp"
#include "config.hpp"
#include "estimate.hpp"
#include "flow.hpp"
#include "handlers.hpp"
#include "outcome.hpp"
#include "protocol.hpp"
#include "ring.hpp"
#include "serialize.hpp"
#include "shm.hpp"
#include "system.hpp"

namespace procpool::detail {

class JobState;

/// What a job needs of the pool that runs it, once submitted: to withdraw its
/// tasks not yet started, and to run a callback on the pool's callback thread.
class JobHost {
 public:
  virtual ~JobHost() = default;
  /// Withdraws the job's chunks that no worker has started; they never run
  /// (and are not delivered). Returns how many.
  virtual std::size_t withdraw(const JobState& job) = 0;
  /// Runs `work` on the pool's callback thread (false: there is none to be had).
  virtual bool post_callback(std::function<void()> work) = 0;
};

class JobState {
 public:
  explicit JobState(std::string_view call);
  JobState(const JobState&) = delete;
  JobState& operator=(const JobState&) = delete;
  virtual ~JobState() = default;

  std::string_view call() const { return call_; }

  /// Takes a call's settings: its retry and timeout overrides, and whom to
  /// tell of progress (`total` items, if known). Before the first submit only.
  /// @throws std::invalid_argument a negative task_timeout.
  void configure(const CallOptions& options, std::optional<std::size_t> total);

  /**
   * The job runs callbacks of the user's (progress, map_async's callback):
   * the dispatcher hands its outcomes to the pool's callback thread, which
   * delivers them, so the callbacks never run on the I/O thread and may call
   * back into the pool. Before the first submit only.
   */
  void set_gated() { gated_ = true; }
  bool gated() const { return gated_; }

  /// Options::raise_original_exceptions. Before the first submit only.
  void set_raise_original(bool raise) { raise_original_ = raise; }
  bool raise_original() const { return raise_original_; }

  /// The pool the job was submitted to; set by the dispatcher as it takes the
  /// job's first chunk.
  void attach(const std::shared_ptr<JobHost>& host) {
    std::lock_guard lock(mutex_);
    if (host_.expired()) host_ = host;
  }
  std::shared_ptr<JobHost> host() const {
    std::lock_guard lock(mutex_);
    return host_.lock();
  }

  /**
   * For a call that submits its chunks as its caller takes results (imap):
   * its workers then sleep as soon as they run out of tasks, since their
   * next ones wait for the caller, whose thread needs the CPU. Before the
   * first submit only.
   */
  void set_streamed() { streamed_ = true; }

  // ---- dispatcher side ----
  bool streamed() const { return streamed_; }
  std::optional<std::size_t> retries() const { return retries_; }
  std::optional<std::chrono::milliseconds> task_timeout() const { return task_timeout_; }

  /// A chunk of `items` items is settled (results or failure).
  void deliver(std::uint64_t chunk, ChunkOutcome&& outcome, std::size_t items) {
    struct One {
      std::uint64_t chunk;
      ChunkOutcome outcome;
      std::size_t items;
    } one{chunk, std::move(outcome), items};
    deliver(&one, &one + 1);
  }

  /**
   * Several chunks settled at once: each element of [first, last) has
   * `chunk`, `outcome` and `items`, as deliver()'s arguments. One lock and
   * at most one wake-up of the caller for them all.
   */
  template <class It>
  void deliver(It first, It last) {
    // Reported before the outcomes can be taken, so a call that returns has
    // had its last progress report.
    if (progress_ && !cancelled()) {
      for (It d = first; d != last; ++d) report_progress(d->items);
    }
    bool wanted = false;
    {
      std::lock_guard lock(mutex_);
      if (cancelled_) return;
      for (It d = first; d != last; ++d) {
        if (!d->outcome.failure() && d->items != 0) {
          // Per-item run time, smoothed over the last few chunks: adaptive chunking's measure.
          const double per_item = static_cast<double>(d->outcome.run_ns) / static_cast<double>(d->items);
          item_ns_.add(per_item);
        }
        flow_.answered(d->chunk, d->outcome.held_bytes());
        ready_.insert(d->chunk, std::move(d->outcome));
      }
      // Wakes the caller only when what it waits for is there: a map waiting
      // for a batch of chunks is not woken for each (a wake-up costs more
      // than a small chunk's decoding).
      wanted = std::any_of(waiters_.begin(), waiters_.end(), [](const Waiter& w) { return w.ready(w.pred); });
      if (wanted) {
        ++wakeups_;
        wake_pumping_waiters();
      }
    }
    if (wanted) cv_.notify_all();
    on_delivered();
  }
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }
  /// Whether this thread runs the job's progress callback now.
  bool reporting_here() const {
    return reporting_thread_.load(std::memory_order_relaxed) == std::this_thread::get_id();
  }

  // ---- caller side ----
  /// Drops undelivered and future outcomes: the caller lost interest. Once
  /// it returns, the progress callback is not running and is never called
  /// again, so whatever it refers to may go.
  void cancel();

  /**
   * Waits for an outcome, then takes it and those ready after it, at most
   * `most` of them and, past the first, while they hold at most `most_bytes`:
   * with `first`, chunk `first` and the chunks after it up to the first one
   * missing (imap); without, any (imap_unordered). Taking a batch at once
   * spares the caller a wait, and a lock, per chunk. Empty if the deadline
   * passed first.
   */
  std::vector<std::pair<std::uint64_t, ChunkOutcome>> take_some(std::optional<std::uint64_t> first, Deadline deadline,
                                                                std::size_t most, std::size_t most_bytes);

  /**
   * Waits until chunk `first` has arrived and at least `min_delivered` chunks
   * have, then takes the outcomes of `first`, `first + 1`, ... up to the
   * first one still missing: how the synchronous map decodes while later
   * chunks still run. Appends them to `run` (a vector the caller reuses).
   * Must not be used on a cancelled job.
   */
  void take_run(std::uint64_t first, std::size_t min_delivered, std::vector<ChunkOutcome>& run);

  /**
   * Before submitting chunks `first`, `first + 1`, ... with task messages of
   * `bytes[i]` bytes (numbered on from those counted before): counts them
   * as out (Flow::sending). For a call that asks room() or wait_room().
   */
  void sending(std::uint64_t first, const std::vector<std::size_t>& bytes);

  /// Whether `pending` more chunks, of `pending_bytes` task bytes, fit within
  /// `limits` now (see Flow::room).
  bool room(const FlowLimits& limits, std::size_t pending, std::size_t pending_bytes) const;

  /// Waits until chunks of `pending_bytes` task bytes fit within `limits`.
  void wait_room(const FlowLimits& limits, std::size_t pending_bytes);

  /// Recent run time per item, in ns, once a chunk has succeeded.
  std::optional<double> item_ns() const {
    std::lock_guard lock(mutex_);
    return item_ns_.get();
  }

  /// How often a delivery woke a waiting caller (for tests).
  std::size_t wakeups() const {
    std::lock_guard lock(mutex_);
    return wakeups_;
  }

  /// Bytes of results delivered and not yet taken.
  std::size_t ready_bytes() const {
    std::lock_guard lock(mutex_);
    return flow_.ready_bytes();
  }

  bool wait_delivered(std::size_t count, Deadline deadline);

  std::size_t delivered() const {
    std::lock_guard lock(mutex_);
    return flow_.delivered();
  }

  /// All outcomes delivered so far, in chunk order.
  std::vector<ReadyOutcomes::Entry> take_all();

 protected:
  /// Runs after each delivery, outside the job's lock: on the callback
  /// thread for a gated job (where map_async/apply_async run their
  /// callbacks), else on the I/O thread.
  virtual void on_delivered() {}

  /// Throws PoolNotRunning in a child made by fork() from the pool's process,
  /// where the job's outcomes never come.
  void require_owner() const { owner_.require(); }

  /// delivered(), for a predicate of wait_for() (which holds the lock).
  std::size_t delivered_locked() const { return flow_.delivered(); }

  /// Waits until `pred` (called under the job's lock) holds, or `deadline`.
  template <class Pred>
  bool wait_for(Deadline deadline, Pred pred) {
    std::unique_lock lock(mutex_);
    return wait(lock, deadline, pred);
  }

  /// Runs `change` under the job's lock, then wakes every waiter.
  template <class Change>
  void change_and_notify(Change change) {
    {
      std::lock_guard lock(mutex_);
      change();
      wake_pumping_waiters();
    }
    cv_.notify_all();
  }

 private:
  /// A thread in wait(): deliver() notifies only when one of their
  /// predicates has become true. A callback thread running its queue
  /// meanwhile is woken by `wake` (CallbackRunner::waker).
  struct Waiter {
    const void* pred;
    bool (*ready)(const void*);
    std::function<void()> wake;
  };

  /// With mutex_ held.
  void wake_pumping_waiters() {
    for (const Waiter& w : waiters_) {
      if (w.wake) w.wake();
    }
  }

  template <class Pred>
  bool wait(std::unique_lock<std::mutex>& lock, Deadline deadline, Pred pred) {
    if (pred()) return true;
    require_owner();  // in a child made by fork(), nothing would ever come
    auto ready = [](const void* p) { return (*static_cast<const Pred*>(p))(); };
    if (gated_ && CallbackRunner::on_runner_thread()) {
      // A callback waits for this job, whose news comes through a callback
      // thread: this one, which then runs its queue while it waits, or
      // another pool's, which wakes this one when the news is in.
      waiters_.push_back({&pred, ready, CallbackRunner::waker()});
      lock.unlock();
      bool ok = false;
      try {
        ok = CallbackRunner::pump_until(
            [&] {
              std::lock_guard relock(mutex_);
              return pred();
            },
            deadline);
      } catch (...) {
        lock.lock();
        unregister(&pred);
        throw;
      }
      lock.lock();
      unregister(&pred);
      return ok || pred();
    }
    waiters_.push_back({&pred, ready, nullptr});
    bool ok = true;
    try {
      if (!deadline) {
        cv_.wait(lock, pred);
      } else {
        ok = cv_.wait_until(lock, *deadline, pred);
      }
    } catch (...) {
      unregister(&pred);
      throw;
    }
    unregister(&pred);
    return ok;
  }

  void unregister(const void* pred) {
    waiters_.erase(std::find_if(waiters_.begin(), waiters_.end(), [&](const Waiter& w) { return w.pred == pred; }));
  }

  /// Called from the I/O thread, and from a submitting thread for tasks
  /// refused at once: one at a time, with a running count.
  void report_progress(std::size_t items) {
    // A progress callback that waits for a call runs the callback queue
    // meanwhile (CallbackRunner::pump_until), which may hold this job's
    // next report: that one is counted now and reported once it returns.
    if (reporting_here()) {
      unreported_ += items;
      return;
    }
    std::lock_guard lock(progress_mutex_);
    if (cancelled()) return;
    reporting_thread_.store(std::this_thread::get_id(), std::memory_order_relaxed);
    done_ += items;
    do {
      done_ += std::exchange(unreported_, 0);
      try {
        progress_(done_, total_);
      } catch (...) {
        if (!progress_failed_) {
          progress_failed_ = true;
          report_callback_exception(call_, "progress callback", "the pool goes on");
        }
      }
    } while (unreported_ != 0 && !cancelled());
    reporting_thread_.store(std::thread::id(), std::memory_order_relaxed);
  }

  std::string call_;
  bool streamed_ = false;
  bool gated_ = false;
  bool raise_original_ = false;
  std::weak_ptr<JobHost> host_;
  std::optional<std::size_t> retries_;
  std::optional<std::chrono::milliseconds> task_timeout_;
  ProgressCallback progress_;
  std::optional<std::size_t> total_;
  std::mutex progress_mutex_;
  std::atomic<std::thread::id> reporting_thread_{};  // where progress_ runs now, if it does
  std::size_t unreported_ = 0;                       // items settled while it ran there (report_progress)
  std::size_t done_ = 0;
  bool progress_failed_ = false;
  RunTimeEstimate item_ns_{0.3};  // follows the input's changes within a few chunks
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<Waiter> waiters_;
  ReadyOutcomes ready_;
  std::size_t wakeups_ = 0;
  Flow flow_;  // what of the call is out (its back-pressure), what was delivered and taken
  std::atomic<bool> cancelled_{false};
  const OwnerProcess owner_;  // the pool's process (require_owner)
};

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE JobState::JobState(std::string_view call) : call_(call) {}

PROCPOOL_ENGINE_INLINE void JobState::configure(const CallOptions& options, std::optional<std::size_t> total) {
  if (options.task_timeout && options.task_timeout->count() < 0) {
    throw std::invalid_argument(
        fmt::format("procpool: {}: CallOptions::task_timeout is negative ({} ms); use 0ms "
                    "to lift the pool's limit",
                    call_, options.task_timeout->count()));
  }
  retries_ = options.retries;
  task_timeout_ = options.task_timeout;
  progress_ = options.progress;
  total_ = total;
  if (progress_) gated_ = true;
}

PROCPOOL_ENGINE_INLINE void JobState::cancel() {
  {
    std::lock_guard lock(mutex_);
    cancelled_ = true;
    ready_.clear();
  }
  // Progress is reported only on the callback thread: there, no report runs
  // but perhaps the one calling this (which must not wait for itself).
  if (CallbackRunner::on_runner_thread()) return;
  std::lock_guard wait_for_report(progress_mutex_);
}

PROCPOOL_ENGINE_INLINE std::vector<std::pair<std::uint64_t, ChunkOutcome>> JobState::take_some(
    std::optional<std::uint64_t> first, Deadline deadline, std::size_t most, std::size_t most_bytes) {
  std::unique_lock lock(mutex_);
  std::vector<std::pair<std::uint64_t, ChunkOutcome>> taken;
  if (!wait(lock, deadline, [&] { return first ? ready_.contains(*first) : !ready_.empty(); })) return taken;
  std::size_t bytes = 0;
  const std::size_t at = first ? ready_.find(*first) : 0;
  while (at < ready_.size() && taken.size() < std::max<std::size_t>(1, most) &&
         (taken.empty() || bytes + ready_[at].second.held_bytes() <= most_bytes) &&
         (!first || ready_[at].first == *first + taken.size())) {
    auto& [chunk, outcome] = ready_[at];
    bytes += outcome.held_bytes();
    flow_.taken(chunk, outcome.held_bytes());
    taken.emplace_back(chunk, std::move(outcome));
    ready_.erase(at);
  }
  return taken;
}

PROCPOOL_ENGINE_INLINE void JobState::take_run(std::uint64_t first, std::size_t min_delivered,
                                               std::vector<ChunkOutcome>& run) {
  std::unique_lock lock(mutex_);
  wait(lock, std::nullopt, [&] { return flow_.delivered() >= min_delivered && ready_.contains(first); });
  for (std::size_t at = ready_.find(first), k = 0; at < ready_.size() && ready_[at].first == first + k;
       ready_.erase(at), ++k) {
    flow_.taken(ready_[at].first, ready_[at].second.held_bytes());
    run.push_back(std::move(ready_[at].second));
  }
}

PROCPOOL_ENGINE_INLINE void JobState::sending(std::uint64_t first, const std::vector<std::size_t>& bytes) {
  std::lock_guard lock(mutex_);
  flow_.sending(first, bytes);
}

PROCPOOL_ENGINE_INLINE bool JobState::room(const FlowLimits& limits, std::size_t pending,
                                           std::size_t pending_bytes) const {
  std::lock_guard lock(mutex_);
  return flow_.room(limits, pending, pending_bytes);
}

PROCPOOL_ENGINE_INLINE void JobState::wait_room(const FlowLimits& limits, std::size_t pending_bytes) {
  std::unique_lock lock(mutex_);
  wait(lock, std::nullopt, [&] { return flow_.room(limits, 0, pending_bytes); });
}

PROCPOOL_ENGINE_INLINE bool JobState::wait_delivered(std::size_t count, Deadline deadline) {
  std::unique_lock lock(mutex_);
  return wait(lock, deadline, [&] { return flow_.delivered() >= count; });
}

PROCPOOL_ENGINE_INLINE std::vector<ReadyOutcomes::Entry> JobState::take_all() {
  std::lock_guard lock(mutex_);
  std::vector<ReadyOutcomes::Entry> all;
  all.reserve(ready_.size());
  for (std::size_t k = 0; k < ready_.size(); ++k) {
    flow_.taken(ready_[k].first, ready_[k].second.held_bytes());
    all.push_back(std::move(ready_[k]));
  }
  ready_.clear();
  return all;
}

}  // namespace procpool::detail
#endif

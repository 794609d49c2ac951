// procpool - the shared state behind an AsyncResult: a job's mailbox plus
// its decoded value, its callbacks, and the collectors of map_async (chunks
// in order) and apply_async (one value).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>
#include <variant>

#include <fmt/format.h>

#include "../errors.hpp"
#include "job.hpp"

namespace procpool {

template <class R>
class AsyncResult;

namespace detail {

/// Positions of results in the order they finish (procpool::wait, as_completed).
struct CompletionOrder {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<std::size_t> finished;
  std::function<void()> wake;  // set while a callback thread waits (CallbackRunner::pump_until)

  void finished_one(std::size_t position) {
    {
      std::lock_guard lock(mutex);
      finished.push_back(position);
      if (wake) wake();
    }
    cv.notify_all();
  }

  /// Waits until `met()`, checked under `mutex`; false if `deadline` passed
  /// first. With `pump`, a callback waiting here runs its thread's queue
  /// meanwhile: the results it waits for may finish only once their
  /// callbacks, queued behind it, have run.
  template <class Met>
  bool await(Deadline deadline, bool pump, Met met) {
    if (!pump || !CallbackRunner::on_runner_thread()) {
      std::unique_lock lock(mutex);
      if (!deadline) {
        cv.wait(lock, met);
        return true;
      }
      return cv.wait_until(lock, *deadline, met);
    }
    {
      std::lock_guard lock(mutex);
      wake = CallbackRunner::waker();
    }
    struct Unhook {
      CompletionOrder& order;
      ~Unhook() {
        std::lock_guard lock(order.mutex);
        order.wake = nullptr;
      }
    } unhook{*this};
    return CallbackRunner::pump_until(
        [&] {
          std::lock_guard lock(mutex);
          return met();
        },
        deadline);
  }
};

/// "procpool: the map_async call's own callback waited for it to finish...".
PROCPOOL_ENGINE_INLINE std::string own_callback_wait_message(std::string_view call);
/// What get() of a call cancelled with `withdrawn` of its `chunks` tasks unrun throws.
PROCPOOL_ENGINE_INLINE std::string cancelled_message(std::string_view call, std::size_t withdrawn, std::size_t chunks);
/// What get(timeout) throws when the call did not finish within `ms`.
PROCPOOL_ENGINE_INLINE std::string not_finished_message(std::string_view call, double ms);
/// What successful() throws before the call finished.
PROCPOOL_ENGINE_INLINE std::string not_yet_finished_message(std::string_view call);

/// Shared state of an AsyncResult: the job's mailbox plus the decoded value.
template <class V>
class AsyncState : public JobState {
 public:
  using Callback = std::function<void(const V&)>;
  using ErrorCallback = std::function<void(const Error&)>;

  AsyncState(std::string_view call, std::size_t chunks) : JobState(call), chunks_(chunks) {}

  std::size_t chunk_count() const { return chunks_; }
  /// Whether the call is over: withdrawn (cancel()), or every chunk
  /// delivered and, for a call with callbacks, those run.
  bool complete() const {
    if (withdrawn_.load(std::memory_order_acquire)) return true;
    return has_callbacks_ ? done_.load(std::memory_order_acquire) : delivered() >= chunks_;
  }
  /// Whether the call's callback, or its progress callback, runs on this
  /// thread now: the call finishes only once it returns (the chunk a
  /// progress report is for is taken in after it).
  bool finishes_after_this_callback() const {
    if (complete()) return false;
    return (has_callbacks_ && callback_thread_.load(std::memory_order_relaxed) == std::this_thread::get_id()) ||
           this->reporting_here();
  }
  /// What waiting for the call from its own callback throws.
  Error own_callback_wait() const { return Error(own_callback_wait_message(this->call())); }

  /// @throws Error waiting for ever from this call's own callback, which
  /// the call's completion waits for.
  bool wait_complete(Deadline deadline) {
    this->require_owner();  // before any lock: one may have been copied held
    if (!deadline && finishes_after_this_callback()) throw own_callback_wait();
    return this->wait_for(deadline, [&] {
      if (withdrawn_.load(std::memory_order_relaxed)) return true;
      return has_callbacks_ ? done_.load(std::memory_order_relaxed) : this->delivered_locked() >= chunks_;
    });
  }

  /// Decodes once, after completion; then value_ or error_ is set. Not in
  /// a child made by fork(), which may not have the results' memory.
  void finalize() {
    wait_complete(std::nullopt);
    decode_once();
  }

  const V& value() {
    finalize();
    if (error_) std::rethrow_exception(error_);
    return *value_;
  }
  V take_value() {
    finalize();
    if (error_) std::rethrow_exception(error_);
    return std::move(*value_);
  }
  bool failed() {
    finalize();
    return error_ != nullptr;
  }
  /// The error get() would throw, once complete (empty if it succeeded).
  std::exception_ptr error() {
    finalize();
    return error_;
  }

  /// A call of no chunks (an empty input) has nothing delivered: its
  /// callbacks run now, on the pool's callback thread, as after a last
  /// delivery, and it is complete once they have run.
  static void complete_without_chunks(const std::shared_ptr<AsyncState>& state, JobHost& host) {
    if (state->chunks_ != 0) return;
    if (!state->has_callbacks_) return state->notify_complete();  // procpool::wait, add_done_callback
    if (!host.post_callback([state] { state->on_delivered(); })) state->on_delivered();
  }

  void set_callbacks(Callback callback, ErrorCallback error_callback) {
    callback_ = std::move(callback);
    error_callback_ = std::move(error_callback);
    has_callbacks_ = callback_ || error_callback_;
    if (has_callbacks_) this->set_gated();
  }

  /**
   * Withdraws the call's chunks no worker has started (they never run). If
   * any was, the call is over: cancelled, get() throws Cancelled, and what
   * its running chunks return is dropped. Returns whether it was.
   */
  bool withdraw() {
    if (complete()) return false;
    std::shared_ptr<JobHost> host = this->host();
    const std::size_t withdrawn = host ? host->withdraw(*this) : 0;
    if (withdrawn == 0) return false;
    // A chunk will never be delivered now: the call cannot complete otherwise.
    std::call_once(once_, [&] {
      error_ = std::make_exception_ptr(Cancelled(cancelled_message(this->call(), withdrawn, chunks_)));
    });
    this->change_and_notify([&] { withdrawn_.store(true, std::memory_order_release); });
    this->cancel();  // later deliveries are dropped
    notify_complete();
    return true;
  }
  bool withdrawn() const { return withdrawn_.load(std::memory_order_acquire); }

  /// Tells `order` (as `position`) once the call is complete, from the
  /// thread that completes it, or now if it is: for procpool::wait and
  /// as_completed. No allocation in the common case of one listener.
  void on_complete(const std::shared_ptr<CompletionOrder>& order, std::size_t position) {
    this->require_owner();  // procpool::wait would wait for ever
    {
      std::lock_guard lock(listeners_mutex_);
      if (!notified_) {
        if (!listener_.order) {
          listener_ = {order, position};
        } else {
          more_listeners_.push_back({order, position});
        }
        return;
      }
    }
    order->finished_one(position);
  }

  /// Runs `callback` once the call is complete: on the pool's callback thread,
  /// or now, on this thread, if it is complete already.
  void add_done_callback(std::function<void()> callback) {
    this->require_owner();  // it would never run
    {
      std::lock_guard lock(listeners_mutex_);
      // Complete, and the thread that completed it not yet through
      // notify_complete(): ready() already says so, and so must this.
      if (!notified_ && !complete()) {
        done_callbacks_.push_back(std::move(callback));
        return;
      }
    }
    run_guarded(callback, "done callback");
  }

 protected:
  /// Builds the value from every chunk's outcome (in chunk order) or throws the first error.
  virtual V decode(std::vector<ReadyOutcomes::Entry> outcomes) = 0;

  /// After each delivery: once every chunk is in, a call with callbacks
  /// (on the callback thread) decodes, runs them, and only then makes the
  /// result ready (as Python's does: a caller of wait() sees what the
  /// callback did). Then whoever waits for its completion hears of it.
  void on_delivered() override {
    if (delivered() < chunks_) return;
    if (has_callbacks_) {
      if (done_.load(std::memory_order_relaxed)) return;
      decode_once();
      run_callbacks();
      this->change_and_notify([&] { done_.store(true, std::memory_order_release); });
    }
    notify_complete();
  }

 private:
  void decode_once() {
    std::call_once(once_, [this] {
      try {
        value_.emplace(decode(take_all()));
      } catch (...) {
        error_ = std::current_exception();
      }
    });
  }

  /// The call is complete: its listeners run here, its done callbacks on the
  /// callback thread. Once.
  void notify_complete() {
    Listener first;
    std::vector<Listener> more;
    std::vector<std::function<void()>> callbacks;
    {
      std::lock_guard lock(listeners_mutex_);
      if (notified_) return;
      notified_ = true;
      first = std::move(listener_);
      more.swap(more_listeners_);
      callbacks.swap(done_callbacks_);
    }
    if (first.order) first.order->finished_one(first.position);
    for (auto& listener : more) listener.order->finished_one(listener.position);
    if (callbacks.empty()) return;
    auto run = [this, callbacks = std::move(callbacks)] {
      for (const auto& callback : callbacks) run_guarded(callback, "done callback");
    };
    std::shared_ptr<JobHost> host = this->host();
    if (!host || !host->post_callback(run)) run();
  }

  void run_guarded(const std::function<void()>& callback, const char* what) {
    try {
      callback();
    } catch (...) {
      report_callback_exception(this->call(), what, "the pool goes on");
    }
  }

  void run_callbacks() {
    callback_thread_.store(std::this_thread::get_id(), std::memory_order_relaxed);
    struct Done {
      std::atomic<std::thread::id>& thread;
      ~Done() { thread.store(std::thread::id(), std::memory_order_relaxed); }
    } done{callback_thread_};
    // A throwing callback must not take the callback thread down with it.
    const char* running = "callback";
    try {
      if (error_) {
        if (error_callback_) {
          try {
            std::rethrow_exception(error_);
          } catch (const Error& e) {
            running = "error_callback";
            error_callback_(e);
          } catch (const std::nested_exception& original) {
            // Options::raise_original_exceptions: a task's own exception
            // type, with the RemoteError the callback takes nested in it.
            try {
              original.rethrow_nested();
            } catch (const Error& e) {
              running = "error_callback";
              error_callback_(e);
            }
          }
        }
      } else if (callback_) {
        callback_(*value_);
      }
    } catch (...) {
      report_callback_exception(this->call(), running, "the pool goes on");
    }
  }

  std::size_t chunks_;
  bool has_callbacks_ = false;                      // a callback or error_callback: the call completes once they ran
  std::atomic<bool> done_{false};                   // (with callbacks) they have run: the call is complete
  std::atomic<std::thread::id> callback_thread_{};  // where its callback runs now, if it does
  std::atomic<bool> withdrawn_{false};              // cancel() withdrew part of it: it is complete, as Cancelled
  std::once_flag once_;
  std::optional<V> value_;
  std::exception_ptr error_;
  Callback callback_;
  ErrorCallback error_callback_;
  std::mutex listeners_mutex_;
  bool notified_ = false;  // its completion was announced
  struct Listener {
    std::shared_ptr<CompletionOrder> order;
    std::size_t position = 0;
  };
  Listener listener_;  // the first one, inline
  std::vector<Listener> more_listeners_;
  std::vector<std::function<void()>> done_callbacks_;
};

/// map_async/starmap_async: `count` items in chunks of `chunksize`, collected in order.
template <class T>
class MapState final : public AsyncState<std::vector<T>> {
 public:
  MapState(std::string_view call, std::size_t count, std::size_t chunksize)
      : AsyncState<std::vector<T>>(call, chunksize == 0 || count == 0 ? 0 : (count - 1) / chunksize + 1),
        count_(count),
        chunksize_(chunksize) {}

 protected:
  std::vector<T> decode(std::vector<ReadyOutcomes::Entry> outcomes) override {
    std::vector<T> values;
    values.reserve(count_);
    std::exception_ptr first_error;
    for (auto& [chunk, outcome] : outcomes) {
      decode_into(chunk, outcome, values, first_error);
      if (first_error) std::rethrow_exception(first_error);
    }
    return values;
  }

 public:
  /// The synchronous map, while it still encodes: decodes the results ready
  /// in order, without waiting, so their memory goes early.
  void collect_ready() {
    if (next_ < this->chunk_count() && this->ready_bytes() != 0) collect_run(next_ + 1, Clock::now());
  }

  /**
   * The synchronous map's way to its value, instead of take_value(): decodes
   * the chunks in order while later ones still run, and frees each result
   * message once decoded. Like decode(), throws the first failed item's
   * error, but only after every chunk has arrived.
   */
  std::vector<T> collect() {
    const std::size_t chunks = this->chunk_count();
    // Wakes up for a batch of chunks rather than for each: a wake-up costs
    // more than decoding a chunk of small items.
    const std::size_t step = std::max<std::size_t>(1, chunks / 16);
    while (next_ < chunks) collect_run(std::min(chunks, next_ + step), std::nullopt);
    if (first_error_) std::rethrow_exception(first_error_);
    return std::move(values_);
  }

 private:
  /// Decodes chunk next_ and those ready after it, once at least
  /// `min_delivered` chunks have arrived; with a `deadline`, only what is
  /// there by then.
  void collect_run(std::size_t min_delivered, Deadline deadline) {
    if (values_.capacity() == 0) values_.reserve(count_);
    try {
      run_.clear();
      if (deadline) {
        for (auto& [chunk, outcome] : this->take_some(next_, deadline, SIZE_MAX, SIZE_MAX)) {
          run_.push_back(std::move(outcome));
        }
      } else {
        this->take_run(next_, min_delivered, run_);
      }
      for (auto& outcome : run_) {
        // After a failure the rest only has to arrive.
        if (!first_error_) decode_into(next_, outcome, values_, first_error_);
        outcome = ChunkOutcome{};  // its memory goes now
        ++next_;
      }
      run_.clear();
    } catch (...) {
      this->cancel();  // out of memory, say: the rest is of no use to anyone
      throw;
    }
  }

  /// Appends chunk `chunk`'s values; keeps the first error seen.
  void decode_into(std::uint64_t chunk, const ChunkOutcome& outcome, std::vector<T>& values,
                   std::exception_ptr& first_error) {
    const std::size_t first = chunk * chunksize_;
    decode_chunk<T>(
        outcome, this->call(), this->raise_original(), first, std::min(chunksize_, count_ - first),
        [&](std::size_t, T&& value) { values.push_back(std::move(value)); },
        [&](std::size_t, std::exception_ptr error) {
          if (!first_error) first_error = std::move(error);
        });
  }

  std::size_t count_;
  std::size_t chunksize_;
  // The synchronous map's collection: results so far, the next chunk to decode.
  std::vector<T> values_;
  std::exception_ptr first_error_;
  std::size_t next_ = 0;
  std::vector<ChunkOutcome> run_;  // the outcomes being decoded: kept for its capacity
};

/// apply_async: one task, one value.
template <class T>
class ApplyState final : public AsyncState<T> {
 public:
  explicit ApplyState(std::string_view call) : AsyncState<T>(call, 1) {}

 protected:
  T decode(std::vector<ReadyOutcomes::Entry> outcomes) override {
    std::optional<T> value;
    std::exception_ptr error;
    decode_chunk<T>(
        outcomes.front().second, this->call(), this->raise_original(), 0, 1,
        [&](std::size_t, T&& v) { value.emplace(std::move(v)); },
        [&](std::size_t, std::exception_ptr e) { error = std::move(e); });
    if (error) std::rethrow_exception(error);
    return std::move(*value);
  }
};

template <class V>
struct AsyncAccess;

/// The shared state behind an AsyncResult (for procpool::wait and as_completed).
struct AsyncStateOf {
  template <class R>
  static const auto& get(const AsyncResult<R>& result) {
    return result.state_;
  }
};

}  // namespace detail

}  // namespace procpool

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE std::string own_callback_wait_message(std::string_view call) {
  return fmt::format(
      "procpool: {}'s own callback waited for it to finish, which it does once that callback returns: it would "
      "wait for ever. Use the value the callback is given",
      call);
}

PROCPOOL_ENGINE_INLINE std::string cancelled_message(std::string_view call, std::size_t withdrawn, std::size_t chunks) {
  const std::string what =
      call == "apply_async" ? std::string("the apply_async task") : fmt::format("the {} call", call);
  if (withdrawn == chunks) return fmt::format("procpool: {} was cancelled before it ran", what);
  return fmt::format(
      "procpool: {} was cancelled: {} of its {} tasks had not started and never ran, and the results of the "
      "others are dropped",
      what, withdrawn, chunks);
}

PROCPOOL_ENGINE_INLINE std::string not_finished_message(std::string_view call, double ms) {
  // Negative, NaN: such a timeout only looks.
  if (!(ms > 0)) return fmt::format("procpool: {} had not finished, and a timeout of 0 or less does not wait", call);
  return fmt::format("procpool: {} did not finish within {} ms", call,
                     ms < 1 ? fmt::format("{:.3g}", ms) : fmt::format("{:.0f}", ms));
}

PROCPOOL_ENGINE_INLINE std::string not_yet_finished_message(std::string_view call) {
  return fmt::format("procpool: successful() called before the {} finished", call);
}

}  // namespace procpool::detail
#endif

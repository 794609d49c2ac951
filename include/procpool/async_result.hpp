/// @file
/// The handle to a call that runs in the background: procpool::AsyncResult.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <variant>

#include <fmt/format.h>

#include "detail/job.hpp"
#include "errors.hpp"

namespace procpool {

template <class R>
class AsyncResult;

namespace detail {

/// Shared state of an AsyncResult: the job's mailbox plus the decoded value.
template <class V>
class AsyncState : public JobState {
 public:
  using Callback = std::function<void(const V&)>;
  using ErrorCallback = std::function<void(const Error&)>;

  AsyncState(std::string_view call, std::size_t chunks) : JobState(call), chunks_(chunks) {}

  std::size_t chunk_count() const { return chunks_; }
  /// Whether the call is over: every chunk delivered and, for a call with
  /// callbacks, those run.
  bool complete() const { return has_callbacks_ ? done_.load(std::memory_order_acquire) : delivered() >= chunks_; }
  bool wait_complete(Deadline deadline) {
    if (!has_callbacks_) return wait_delivered(chunks_, deadline);
    return this->wait_for(deadline, [&] { return done_.load(std::memory_order_relaxed); });
  }

  /// Decodes once, after completion; then value_ or error_ is set.
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

  void set_callbacks(Callback callback, ErrorCallback error_callback) {
    callback_ = std::move(callback);
    error_callback_ = std::move(error_callback);
    has_callbacks_ = callback_ || error_callback_;
    if (has_callbacks_) this->set_gated();
  }

 protected:
  /// Builds the value from every chunk's outcome (in chunk order) or throws the first error.
  virtual V decode(std::vector<ReadyOutcomes::Entry> outcomes) = 0;

  /// For a gated call, on the callback thread: once every chunk is in,
  /// decodes, runs the callback, and only then makes the result ready (as
  /// Python's does: a caller of wait() sees what the callback did).
  void on_delivered() override {
    if (!has_callbacks_ || done_.load(std::memory_order_relaxed) || delivered() < chunks_) return;
    decode_once();
    run_callbacks();
    this->change_and_notify([&] { done_.store(true, std::memory_order_release); });
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

  void run_callbacks() {
    // A throwing callback must not take the callback thread down with it.
    try {
      if (error_) {
        if (error_callback_) {
          try {
            std::rethrow_exception(error_);
          } catch (const Error& e) {
            error_callback_(e);
          }
        }
      } else if (callback_) {
        callback_(*value_);
      }
    } catch (...) {
      fmt::print(stderr, "procpool: a {} callback threw {}: {}; the pool goes on\n", call(),
                 current_exception_type_name(), current_exception_message());
    }
  }

  std::size_t chunks_;
  bool has_callbacks_ = false;     // a callback or error_callback: the call completes once they ran
  std::atomic<bool> done_{false};  // (with callbacks) they have run: the call is complete
  std::once_flag once_;
  std::optional<V> value_;
  std::exception_ptr error_;
  Callback callback_;
  ErrorCallback error_callback_;
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
        outcome, this->call(), first, std::min(chunksize_, count_ - first),
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
        outcomes.front().second, this->call(), 0, 1, [&](std::size_t, T&& v) { value.emplace(std::move(v)); },
        [&](std::size_t, std::exception_ptr e) { error = std::move(e); });
    if (error) std::rethrow_exception(error);
    return std::move(*value);
  }
};

template <class V>
struct AsyncAccess;

}  // namespace detail

/**
 * The result of `apply_async`, `map_async` or `starmap_async`: Python's
 * `AsyncResult`. Copies share one result. `R` is `void` for a function
 * returning void.
 *
 * Example:
 * @code
 * procpool::AsyncResult<long> r = pool.apply_async<square>(7);
 * do_other_work();
 * long v = r.get(std::chrono::seconds(5));  // TimeoutError after 5 s
 * @endcode
 *
 * All member functions are thread-safe. The result stays valid after the
 * pool is gone; a pool terminated before the task finished makes get()
 * throw `PoolNotRunning`.
 */
template <class R>
class AsyncResult {
  using V = detail::stored_t<R>;

 public:
  /// An empty handle; valid() is false. Every other member function needs a valid() handle.
  AsyncResult() = default;

  /// Whether this handle refers to a call. @return false for a default-constructed handle.
  bool valid() const noexcept { return state_ != nullptr; }

  /**
   * Waits for the call and returns its result.
   * @return a const reference to the result, valid while this handle or a
   *         copy of it lives (nothing when `R` is void).
   * @throws RemoteError the task threw (for map_async: the first failed item by input index)
   * @throws WorkerLost the worker running it died
   * @throws TaskTimeout the task ran longer than its task_timeout
   * @throws PoolNotRunning the pool was terminated first
   */
  decltype(auto) get() const {
    state_->wait_complete(std::nullopt);
    return result();
  }

  /**
   * Like get(), but gives up after `timeout`.
   * @param timeout how long to wait at most.
   * @return as get().
   * @throws TimeoutError the call had not finished in time (it goes on running)
   * @throws Error as get() if the call failed
   */
  template <class Rep, class Period>
  decltype(auto) get(std::chrono::duration<Rep, Period> timeout) const {
    if (!wait(timeout)) {
      throw TimeoutError(fmt::format("procpool: {} did not finish within {} ms", state_->call(),
                                     std::chrono::duration_cast<std::chrono::milliseconds>(timeout).count()));
    }
    return result();
  }

  /// Waits until the call has finished (successfully or not).
  void wait() const { state_->wait_complete(std::nullopt); }

  /**
   * Waits at most `timeout` for the call to finish.
   * @param timeout how long to wait at most.
   * @return whether the call has finished.
   */
  template <class Rep, class Period>
  bool wait(std::chrono::duration<Rep, Period> timeout) const {
    return state_->wait_complete(detail::Clock::now() + std::chrono::duration_cast<detail::Clock::duration>(timeout));
  }

  /// Whether the call has finished (successfully or not), without waiting.
  bool ready() const { return state_->complete(); }

  /**
   * Whether the call finished without an error.
   * @return false if get() would throw.
   * @throws Error if not ready().
   */
  bool successful() const {
    if (!ready()) throw Error(fmt::format("procpool: successful() called before the {} finished", state_->call()));
    return !state_->failed();
  }

 private:
  template <class>
  friend struct detail::AsyncAccess;
  explicit AsyncResult(std::shared_ptr<detail::AsyncState<V>> state) : state_(std::move(state)) {}

  decltype(auto) result() const {
    if constexpr (std::is_void_v<R>) {
      (void)state_->value();
    } else {
      return static_cast<const R&>(state_->value());
    }
  }

  std::shared_ptr<detail::AsyncState<V>> state_;
};

namespace detail {
template <class R>
struct AsyncAccess {
  static AsyncResult<R> make(std::shared_ptr<AsyncState<stored_t<R>>> state) {
    return AsyncResult<R>(std::move(state));
  }
};
}  // namespace detail

}  // namespace procpool

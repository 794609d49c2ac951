/// @file
/// The handle to a call that runs in the background: procpool::AsyncResult.
#pragma once

#include <chrono>
#include <exception>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

#include "detail/async_state.hpp"
#include "errors.hpp"

namespace procpool {

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
   * @throws Error called from this call's own callback, where it would wait
   *         for ever (the call completes once that callback returns)
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
      const double ms = std::chrono::duration<double, std::milli>(timeout).count();
      throw TimeoutError(detail::not_finished_message(state_->call(), ms));
    }
    return result();
  }

  /// Waits until the call has finished (successfully or not).
  /// @throws Error called from this call's own callback, as get().
  void wait() const { state_->wait_complete(std::nullopt); }

  /**
   * Waits at most `timeout` for the call to finish.
   * @param timeout how long to wait at most.
   * @return whether the call has finished.
   */
  template <class Rep, class Period>
  bool wait(std::chrono::duration<Rep, Period> timeout) const {
    return state_->wait_complete(detail::Clock::now() + detail::clamp_timeout(timeout));
  }

  /// Whether the call has finished (successfully or not, or cancelled), without waiting.
  bool ready() const { return state_->complete(); }

  /**
   * Withdraws the call if no worker has started it: it never runs, get()
   * throws `Cancelled`, and cancelled() is true (Python's `future.cancel()`).
   * A task already running, or done, is left alone. For `map_async`, every
   * chunk not yet started is withdrawn (if any was, the call is cancelled;
   * chunks already running finish and their results are dropped).
   * @return whether the call was cancelled.
   */
  bool cancel() { return state_->withdraw(); }

  /// Whether cancel() withdrew the call.
  bool cancelled() const { return state_->withdrawn(); }

  /**
   * Waits for the call and returns its error without throwing it
   * (Python's `future.exception()`).
   * @return what get() would throw (`Cancelled` for a cancelled call), or
   *         an empty pointer if the call succeeded.
   * @throws Error called from this call's own callback, as get().
   */
  std::exception_ptr exception() const { return state_->error(); }

  /**
   * Calls `callback(*this)` once the call has finished (successfully or
   * not, or cancelled): on the pool's callback thread, where it may call
   * back into the pool; or at once, on this thread, if the call has
   * finished already. An exception it throws is reported on stderr.
   * @param callback invocable with `const AsyncResult<R>&`.
   */
  template <class Callback>
  void add_done_callback(Callback callback) const {
    static_assert(std::is_invocable_v<Callback&, const AsyncResult<R>&>,
                  "procpool: add_done_callback takes a callable invocable with const AsyncResult<R>&");
    state_->add_done_callback([self = *this, callback = std::move(callback)]() mutable { callback(self); });
  }

  /**
   * Whether the call finished without an error.
   * @return false if get() would throw.
   * @throws Error if not ready().
   */
  bool successful() const {
    if (!ready()) throw Error(detail::not_yet_finished_message(state_->call()));
    return !state_->failed();
  }

 private:
  template <class>
  friend struct detail::AsyncAccess;
  friend struct detail::AsyncStateOf;
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

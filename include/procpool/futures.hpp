/// @file
/// Waiting for many results at once, as Python's concurrent.futures does:
/// procpool::as_completed and procpool::wait.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <ranges>
#include <thread>
#include <type_traits>
#include <vector>

#include <fmt/format.h>

#include "async_result.hpp"
#include "errors.hpp"

namespace procpool {

/// When procpool::wait returns (Python's `FIRST_COMPLETED`, `FIRST_EXCEPTION`, `ALL_COMPLETED`).
enum class ReturnWhen {
  first_completed,  ///< as soon as any result is ready
  first_exception,  ///< as soon as any result failed (or was cancelled), or all are ready
  all_completed,    ///< once every result is ready
};

/// What procpool::wait returns: positions in the range it was given, each in
/// increasing order. `auto [done, not_done] = procpool::wait(results);`
struct WaitResult {
  std::vector<std::size_t> done;      ///< positions of the results ready
  std::vector<std::size_t> not_done;  ///< positions of the others
};

namespace detail {

/// Listens to every result of `results`: their positions in finishing order.
template <class Results>
std::shared_ptr<CompletionOrder> listen(const Results& results) {
  auto order = std::make_shared<CompletionOrder>();
  order->finished.reserve(std::ranges::size(results));
  std::size_t position = 0;
  for (const auto& result : results) AsyncStateOf::get(result)->on_complete(order, position++);
  return order;
}

/// How a wait from a callback goes (CompletionOrder::await): which of the
/// results finish only once the waiting callback returns (its own call),
/// and whether any other finishes only once a callback queued behind it
/// has run, so that it must run the queue while it waits.
struct WaitPlan {
  std::vector<std::size_t> own;  // positions
  bool pump = false;
  std::thread::id thread;  // where it was made
};

template <class Result>
WaitPlan plan_wait(const std::vector<Result>& results) {
  WaitPlan plan;
  plan.thread = std::this_thread::get_id();
  if (!CallbackRunner::on_runner_thread()) return plan;
  for (std::size_t k = 0; k < results.size(); ++k) {
    const auto& state = AsyncStateOf::get(results[k]);
    if (state->finishes_after_this_callback()) {
      plan.own.push_back(k);
    } else if (state->gated() && !state->complete()) {
      plan.pump = true;
    }
  }
  return plan;
}

/// Throws what get() throws from a call's own callback when a wait with no
/// deadline needs that call (`all`: every result), or when nothing else is
/// left to end it.
template <class Result>
void refuse_endless_wait(const std::vector<Result>& results, const CompletionOrder& order,
                         const std::vector<std::size_t>& own, bool all) {
  if (!own.empty() && (all || order.finished.size() + own.size() >= results.size())) {
    throw AsyncStateOf::get(results[own.front()])->own_callback_wait();
  }
}

/// procpool::wait, until `deadline` if any.
template <class Results>
WaitResult wait_until(const Results& results, Deadline deadline, ReturnWhen when);

template <class Results>
using result_of_range_t = std::remove_cvref_t<std::ranges::range_value_t<Results>>;

template <class T>
struct AsyncResultTraits {
  static_assert(sizeof(T) == 0, "procpool: as_completed and wait take a range of procpool::AsyncResult<T>");
};
template <class R>
struct AsyncResultTraits<AsyncResult<R>> {
  using value_type = R;
};

}  // namespace detail

/**
 * Waits for results of `apply_async`/`map_async` (Python's
 * `concurrent.futures.wait`), at most `timeout`.
 *
 * @code
 * auto [done, not_done] = procpool::wait(results, 5s, procpool::ReturnWhen::first_completed);
 * @endcode
 *
 * @param results a range of `AsyncResult<T>`.
 * @param timeout how long to wait at most; what is ready by then is `done`.
 * @param when when to return.
 * @return the positions of the results ready, and of the others.
 *
 * Thread-safe. Waits without spinning: each result tells it when it finishes.
 */
template <std::ranges::input_range Results, class Rep, class Period>
WaitResult wait(const Results& results, std::chrono::duration<Rep, Period> timeout,
                ReturnWhen when = ReturnWhen::all_completed) {
  return detail::wait_until(results, detail::Clock::now() + detail::clamp_timeout(timeout), when);
}

/// procpool::wait without a time limit.
template <std::ranges::input_range Results>
WaitResult wait(const Results& results, ReturnWhen when = ReturnWhen::all_completed) {
  return detail::wait_until(results, std::nullopt, when);
}

template <class Results>
WaitResult detail::wait_until(const Results& results, Deadline deadline, ReturnWhen when) {
  std::vector<result_of_range_t<Results>> all(std::ranges::begin(results), std::ranges::end(results));
  auto order = listen(all);
  WaitPlan plan = plan_wait(all);
  if (deadline) plan.own.clear();  // it ends: no need to refuse it
  std::size_t checked = 0;         // finished results already looked at for first_exception
  bool failed = false;
  order->await(deadline, plan.pump, [&] {
    if (order->finished.size() == all.size()) return true;
    if (when == ReturnWhen::first_completed && !order->finished.empty()) return true;
    if (when == ReturnWhen::first_exception) {
      for (; checked < order->finished.size() && !failed; ++checked) {
        failed = all[order->finished[checked]].exception() != nullptr;
      }
      if (failed) return true;
    }
    refuse_endless_wait(all, *order, plan.own, when == ReturnWhen::all_completed);
    return false;
  });
  WaitResult result;
  for (std::size_t k = 0; k < all.size(); ++k) (all[k].ready() ? result.done : result.not_done).push_back(k);
  return result;
}

/**
 * The results of `as_completed`: each `AsyncResult` of the range it was
 * given (a copy sharing its state) as it finishes, in finishing order.
 * Iterate it once, from one thread.
 */
template <class R>
class AsCompleted {
 public:
  /// What end() returns.
  struct sentinel {};

  /// Input iterator over the results in finishing order.
  class iterator {
   public:
    /// The results' type.
    using value_type = AsyncResult<R>;
    /// Required of an iterator; never used.
    using difference_type = std::ptrdiff_t;
    /// A single-pass input iterator.
    using iterator_concept = std::input_iterator_tag;

    /// A singular iterator, only to be assigned to.
    iterator() = default;
    /**
     * The next result to finish, waiting for it if needed.
     * @throws TimeoutError if the timeout passes first.
     */
    const AsyncResult<R>& operator*() const { return owner_->current(); }
    /// Member access to operator*().
    const AsyncResult<R>* operator->() const { return &owner_->current(); }
    /// Moves to the next result to finish. @return `*this`.
    iterator& operator++() {
      owner_->advance();
      return *this;
    }
    /// As the prefix form.
    void operator++(int) { ++*this; }
    /// Whether every result was taken.
    friend bool operator==(const iterator& it, sentinel) { return it.owner_->at_end(); }

   private:
    friend class AsCompleted;
    explicit iterator(AsCompleted* owner) : owner_(owner) {}
    AsCompleted* owner_ = nullptr;
  };

  /// Made by procpool::as_completed: `results` to yield, until `deadline` if given.
  AsCompleted(std::vector<AsyncResult<R>> results, std::optional<std::chrono::steady_clock::time_point> deadline)
      : results_(std::move(results)), deadline_(deadline), order_(detail::listen(results_)) {}

  /// An iterator at the next result to finish.
  iterator begin() { return iterator(this); }
  /// Whether every result was taken.
  bool at_end() const { return taken_ == results_.size(); }
  /// The end: every result taken.
  sentinel end() { return {}; }

 private:
  const AsyncResult<R>& current() {
    if (!current_) {
      auto arrived = [&] { return order_->finished.size() > taken_; };
      bool now = false;
      {
        std::lock_guard lock(order_->mutex);
        now = arrived();
      }
      // Results come in batches: one yield lets the pool hand over the rest
      // of this one before this thread sleeps (each sleep costs a wake-up).
      if (!now) std::this_thread::yield();
      update_plan();
      const bool in_time = order_->await(deadline_, plan_->pump, [&] {
        if (arrived()) return true;
        detail::refuse_endless_wait(results_, *order_, plan_->own, false);
        return false;
      });
      std::lock_guard lock(order_->mutex);
      if (!in_time) {
        throw TimeoutError(fmt::format("procpool: {} of {} results had not finished in time",
                                       results_.size() - order_->finished.size(), results_.size()));
      }
      current_ = order_->finished[taken_];
    }
    return results_[*current_];
  }

  /// Made once per thread that waits; then only its own calls are looked
  /// at again: they finish once their callback, which waited, returns.
  void update_plan() {
    if (!plan_ || plan_->thread != std::this_thread::get_id()) {
      plan_ = detail::plan_wait(results_);
      if (deadline_) plan_->own.clear();  // it ends: no need to refuse it
    } else {
      std::erase_if(plan_->own, [&](std::size_t k) {
        return !detail::AsyncStateOf::get(results_[k])->finishes_after_this_callback();
      });
    }
  }

  void advance() {
    (void)current();
    current_.reset();
    ++taken_;
  }

  std::vector<AsyncResult<R>> results_;
  std::optional<std::chrono::steady_clock::time_point> deadline_;
  std::shared_ptr<detail::CompletionOrder> order_;
  std::size_t taken_ = 0;                 // results yielded and passed
  std::optional<std::size_t> current_;    // position of the one yielded now
  std::optional<detail::WaitPlan> plan_;  // how this thread waits for them (update_plan)
};

/**
 * Yields each result of `results` as it finishes, in finishing order
 * (Python's `concurrent.futures.as_completed`), without busy waiting.
 *
 * @code
 * for (const auto& r : procpool::as_completed(results)) use(r.get());
 * @endcode
 *
 * @param results a range of `AsyncResult<T>` (copied: the copies share their states).
 * @return a single-pass range of `AsyncResult<T>`.
 *
 * The range is consumed from one thread.
 */
template <std::ranges::input_range Results>
auto as_completed(const Results& results) {
  using Result = detail::result_of_range_t<Results>;
  return AsCompleted<typename detail::AsyncResultTraits<Result>::value_type>(
      std::vector<Result>(std::ranges::begin(results), std::ranges::end(results)), std::nullopt);
}

/**
 * as_completed() with a time limit: advancing past the results finished
 * within `timeout` from now throws `TimeoutError`.
 * @param results a range of `AsyncResult<T>`.
 * @param timeout how long all of them may take.
 * @return a single-pass range of `AsyncResult<T>`.
 */
template <std::ranges::input_range Results, class Rep, class Period>
auto as_completed(const Results& results, std::chrono::duration<Rep, Period> timeout) {
  using Result = detail::result_of_range_t<Results>;
  return AsCompleted<typename detail::AsyncResultTraits<Result>::value_type>(
      std::vector<Result>(std::ranges::begin(results), std::ranges::end(results)),
      detail::Clock::now() + detail::clamp_timeout(timeout));
}

}  // namespace procpool

// procpool - the thread that runs a pool's callbacks (map_async's callback
// and error_callback, progress callbacks, done callbacks), one at a time, in
// the order their news came.
//
// Not the I/O thread: a callback may call back into its pool (apply, map,
// close, terminate), and a call that waits for a result needs the I/O
// thread free to bring it. A callback that waits for a result whose news is
// itself queued here runs the queue while it waits (pump_until), so that
// never deadlocks either.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <utility>

#include <fmt/format.h>

#include "handlers.hpp"
#include "thread.hpp"

namespace procpool::detail {

class CallbackRunner {
 public:
  using Work = std::function<void()>;
  using Clock = std::chrono::steady_clock;

  CallbackRunner() : state_(std::make_shared<State>()) {}
  CallbackRunner(const CallbackRunner&) = delete;
  CallbackRunner& operator=(const CallbackRunner&) = delete;
  /// Runs what is still queued, then ends the thread.
  ~CallbackRunner() { stop(); }

  /// Whether the calling thread is a pool's callback thread.
  static bool on_runner_thread() noexcept { return current() != nullptr; }

  /// Queues `work`; starts the thread the first time. Throws std::system_error
  /// if the thread cannot be started, std::runtime_error once stop() has
  /// ended it (the work is then not queued).
  void post(Work work);

  /**
   * On a callback thread, inside a callback: runs that thread's queued
   * work until `done()` holds or `deadline` passes; returns done(). How a
   * callback that waits for news queued behind it gets it.
   */
  template <class Done>
  static bool pump_until(Done done, std::optional<Clock::time_point> deadline) {
    State& state = *current();
    auto news = [&] { return !state.queue.empty() || state.poked; };
    for (;;) {
      if (done()) return true;
      std::unique_lock lock(state.mutex);
      if (!news()) {
        if (!deadline) {
          state.cv.wait(lock, news);
        } else if (!state.cv.wait_until(lock, *deadline, news)) {
          lock.unlock();
          return done();
        }
      }
      state.poked = false;
      if (!state.queue.empty()) run_front(state, lock);
    }
  }

  /// On a callback thread: what wakes its pump_until from any thread, for
  /// news that does not come through the queue. Valid while the callback
  /// that got it runs; `done()` is checked again on each wake.
  static std::function<void()> waker();

  /// Waits until everything queued so far has run. From the runner's own
  /// thread it returns at once: the callback calling it is part of that work.
  void drain();

  /// Runs what is queued, then ends the thread (lets it go, from itself).
  void stop() noexcept;

 private:
  // Shared with the thread, which may outlive the runner: a callback may
  // destroy the pool whose runner runs it.
  struct State {
    std::mutex mutex;
    std::condition_variable cv;    // work queued, or stopping
    std::condition_variable idle;  // nothing queued or running
    std::deque<Work> queue;
    int running = 0;
    bool stopping = false;
    bool poked = false;     // waker() was called: pump_until looks at done() again
    bool finished = false;  // the thread has ended (stopping, and the queue ran empty)
  };

  /// The state of the runner whose thread calls this, or nullptr.
  static State*& current() {
    thread_local State* state = nullptr;
    return state;
  }

  // Static: the runner itself may be gone (a callback destroyed its pool),
  // and only the state is left.
  static void run(const std::shared_ptr<State>& state);

  /// Runs the front of the queue, outside the lock (held on entry and on return).
  static void run_front(State& state, std::unique_lock<std::mutex>& lock);

  static void run_one(Work& work) noexcept;

  std::shared_ptr<State> state_;
  bool thread_started_ = false;  // under state_->mutex
  InternalThread thread_;
};

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE void CallbackRunner::post(Work work) {
  std::unique_lock lock(state_->mutex);
  // Once stopped, nothing would run it: the caller runs it itself.
  if (state_->stopping && (!thread_started_ || state_->finished)) {
    throw std::runtime_error("procpool: the pool's callback thread has ended");
  }
  if (!thread_started_) {
    thread_ = InternalThread("the pool's callback thread", [state = state_] { run(state); });
    thread_started_ = true;
  }
  state_->queue.push_back(std::move(work));
  lock.unlock();
  state_->cv.notify_all();
}

PROCPOOL_ENGINE_INLINE std::function<void()> CallbackRunner::waker() {
  State* state = current();
  return [state] {
    {
      std::lock_guard lock(state->mutex);
      state->poked = true;
    }
    state->cv.notify_all();
  };
}

PROCPOOL_ENGINE_INLINE void CallbackRunner::drain() {
  if (current() == state_.get()) return;
  std::unique_lock lock(state_->mutex);
  state_->idle.wait(lock, [&] { return state_->queue.empty() && state_->running == 0; });
}

PROCPOOL_ENGINE_INLINE void CallbackRunner::stop() noexcept {
  {
    std::lock_guard lock(state_->mutex);
    state_->stopping = true;
  }
  state_->cv.notify_all();
  thread_.join();
}

PROCPOOL_ENGINE_INLINE void CallbackRunner::run(const std::shared_ptr<State>& state) {
  current() = state.get();
  std::unique_lock lock(state->mutex);
  for (;;) {
    state->cv.wait(lock, [&] { return !state->queue.empty() || state->stopping; });
    if (state->queue.empty()) break;
    run_front(*state, lock);
  }
  state->finished = true;
  current() = nullptr;
}

PROCPOOL_ENGINE_INLINE void CallbackRunner::run_front(State& state, std::unique_lock<std::mutex>& lock) {
  Work work = std::move(state.queue.front());
  state.queue.pop_front();
  ++state.running;
  lock.unlock();
  run_one(work);
  work = nullptr;  // what it holds goes outside the lock too
  lock.lock();
  --state.running;
  if (state.queue.empty() && state.running == 0) state.idle.notify_all();
}

PROCPOOL_ENGINE_INLINE void CallbackRunner::run_one(Work& work) noexcept {
  try {
    work();
  } catch (...) {
    // The work items catch the callbacks' own exceptions; this is the backstop.
    fmt::print(stderr, "procpool: a callback threw {}; the pool goes on\n", current_exception_summary());
  }
}

}  // namespace procpool::detail
#endif

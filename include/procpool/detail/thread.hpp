// procpool - the one way procpool starts a thread of its own (the I/O
// thread, the output relay, the callback runner).
#pragma once

#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <exception>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include "system.hpp"

namespace procpool::detail {

/// For tests: the next this many thread starts fail with EAGAIN, as they do
/// when RLIMIT_NPROC is reached.
inline std::atomic<int>& failing_thread_starts() {
  static std::atomic<int> count{0};
  return count;
}

/**
 * A thread of procpool's own. It starts with every signal blocked: signals
 * belong to the program's threads, and a write to a dead worker's pipe or a
 * closed stdout then fails with EPIPE instead of raising SIGPIPE. While it
 * may run it counts in io_thread_count(), so a fork() from a program running
 * only procpool's threads is not taken for a threaded fork.
 *
 * join() (and the destructor) from the thread itself detaches it instead:
 * a callback may end the pool whose thread runs it.
 */
class InternalThread {
 public:
  InternalThread() = default;

  /// Starts `body` on a new thread. `what` names it in the error: throws
  /// std::system_error ("procpool: could not start <what>: ...") if the
  /// thread cannot be made (RLIMIT_NPROC reached, out of memory).
  template <class Body>
  InternalThread(const char* what, Body&& body) {
    ++io_thread_count();
    sigset_t all, old;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &old);
    try {
      int inject = failing_thread_starts().load();
      while (inject > 0 && !failing_thread_starts().compare_exchange_weak(inject, inject - 1)) {
      }
      if (inject > 0) throw std::system_error(EAGAIN, std::generic_category(), "pthread_create");
      thread_ = std::thread(std::forward<Body>(body));
    } catch (const std::system_error& e) {
      ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
      --io_thread_count();
      throw std::system_error(e.code(),
                              std::string("procpool: could not start ") + what +
                                  (e.code().value() == EAGAIN ? " (a thread; RLIMIT_NPROC reached?)" : " (a thread)"));
    } catch (...) {
      ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
      --io_thread_count();
      throw;
    }
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  }

  InternalThread(InternalThread&& other) noexcept : thread_(std::move(other.thread_)) {}
  InternalThread& operator=(InternalThread&& other) noexcept {
    if (this != &other) {
      join();
      thread_ = std::move(other.thread_);
    }
    return *this;
  }
  ~InternalThread() { join(); }

  /// Whether the calling thread is this one.
  bool is_current() const noexcept { return thread_.joinable() && thread_.get_id() == std::this_thread::get_id(); }

  /// Waits for the thread to end (or lets it go, called from itself). Idempotent.
  void join() noexcept {
    if (!thread_.joinable()) return;
    if (is_current()) {
      thread_.detach();
    } else {
      thread_.join();
    }
    --io_thread_count();
  }

 private:
  std::thread thread_;
};

}  // namespace procpool::detail

/// @file
/// The exceptions a pool reports, all derived from procpool::Error.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <exception>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>

#include "detail/config.hpp"
#include "detail/exception_types.hpp"

namespace procpool {

/**
 * Base of every error procpool reports, so `catch (const procpool::Error&)`
 * catches them all. System-call failures are `std::system_error` instead.
 *
 * Example:
 * @code
 * try { pool.map<parse>(files); }
 * catch (const procpool::RemoteError& e) { std::cerr << e.what() << '\n'; }
 * @endcode
 *
 * This and every derived error are immutable once built: all their member
 * functions are thread-safe.
 */
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/**
 * A task threw an exception inside a worker. `what()` names the input index,
 * the exception's demangled type and message, the worker slot and its pid.
 *
 * @code
 * catch (const procpool::RemoteError& e) { log("item {} failed: {}", e.input_index(), e.message()); }
 * @endcode
 *
 * Immutable: all member functions are thread-safe.
 */
class RemoteError : public Error {
 public:
  /**
   * Built by the pool from what the worker reported.
   * @param what the full message `what()` returns.
   * @param type_name demangled type of the exception thrown in the worker.
   * @param message that exception's what().
   * @param pid pid of the worker that ran the task.
   * @param worker slot of that worker.
   * @param input_index position of the failed item in the call's input.
   */
  RemoteError(std::string what, std::string type_name, std::string message, pid_t pid, std::size_t worker,
              std::size_t input_index)
      : Error(std::move(what)),
        type_name_(std::move(type_name)),
        message_(std::move(message)),
        pid_(pid),
        worker_(worker),
        input_index_(input_index) {}

  /// Demangled type of the exception thrown in the worker, e.g. "std::invalid_argument".
  const std::string& type_name() const noexcept { return type_name_; }
  /// The original exception's what().
  const std::string& message() const noexcept { return message_; }
  /// Pid of the worker that ran the task.
  pid_t pid() const noexcept { return pid_; }
  /// Worker slot (0 .. processes-1) that ran the task.
  std::size_t worker() const noexcept { return worker_; }
  /// Position of the failed item in the call's input (0 for apply/apply_async).
  std::size_t input_index() const noexcept { return input_index_; }

  /**
   * Throws the task's exception as its own type, with this RemoteError
   * nested in it (`std::throw_with_nested`: `std::rethrow_if_nested(e)`
   * reaches it), where procpool knows how to make that type: the
   * `<stdexcept>` types, `std::bad_alloc`, and those registered with
   * `procpool::register_exception<E>()`. Otherwise throws this RemoteError.
   *
   * @code
   * catch (const procpool::RemoteError& e) {
   *   try { e.rethrow(); } catch (const std::invalid_argument& bad) { ... }
   * }
   * @endcode
   */
  [[noreturn]] void rethrow() const { std::rethrow_exception(original()); }

  /// What rethrow() throws, without throwing it.
  std::exception_ptr original() const;

 private:
  std::string type_name_;
  std::string message_;
  pid_t pid_;
  std::size_t worker_;
  std::size_t input_index_;
};

/**
 * The worker running a task died before returning its result (a crash, a
 * signal, `_exit`). Only the tasks that worker held fail; the pool replaces it.
 * `Options::retries` runs such tasks again before reporting this.
 *
 * @code
 * catch (const procpool::WorkerLost& e) { log("worker {} died (signal {})", e.pid(), e.signal()); }
 * @endcode
 *
 * Immutable: all member functions are thread-safe.
 */
class WorkerLost : public Error {
 public:
  /**
   * Built by the pool when a worker dies holding a task.
   * @param what the full message `what()` returns.
   * @param pid pid of the worker that died.
   * @param worker slot it occupied.
   * @param input_index position of the lost item in the call's input.
   * @param signal the signal that killed it, or 0 if it exited.
   * @param exit_code its exit code, or -1 if a signal killed it.
   */
  WorkerLost(std::string what, pid_t pid, std::size_t worker, std::size_t input_index, int signal, int exit_code)
      : Error(std::move(what)),
        pid_(pid),
        worker_(worker),
        input_index_(input_index),
        signal_(signal),
        exit_code_(exit_code) {}

  /// Pid of the worker that died.
  pid_t pid() const noexcept { return pid_; }
  /// Worker slot the dead worker occupied.
  std::size_t worker() const noexcept { return worker_; }
  /// Position of the lost item in the call's input (0 for apply/apply_async).
  std::size_t input_index() const noexcept { return input_index_; }
  /// The signal that killed the worker, or 0 if it exited.
  int signal() const noexcept { return signal_; }
  /// The worker's exit code, or -1 if a signal killed it.
  int exit_code() const noexcept { return exit_code_; }

 private:
  pid_t pid_;
  std::size_t worker_;
  std::size_t input_index_;
  int signal_;
  int exit_code_;
};

/// A wait with a timeout (`AsyncResult::get(timeout)`, `IMap::next(timeout)`) ran out.
/// The task itself goes on running. Immutable: thread-safe.
class TimeoutError : public Error {
 public:
  using Error::Error;
};

/// A task ran longer than `Options::task_timeout`: its worker was stopped
/// (SIGTERM, then SIGKILL) and replaced. Unlike TimeoutError, the task is over.
/// Immutable: thread-safe.
class TaskTimeout : public Error {
 public:
  using Error::Error;
};

/// `Options::initializer` threw (or the worker died before it finished). The
/// pool does not respawn workers to retry it: every pending and later task
/// fails with this error. Immutable: thread-safe.
class InitializerError : public Error {
 public:
  using Error::Error;
};

/// A worker sent something that is not a valid procpool message, or a
/// message over `Options::max_message_bytes`. Immutable: thread-safe.
class ProtocolError : public Error {
 public:
  using Error::Error;
};

/// The pool was closed or terminated before the call could run (also: join()
/// on a pool still open). Immutable: thread-safe.
class PoolNotRunning : public Error {
 public:
  using Error::Error;
};

/**
 * The call was withdrawn by `AsyncResult::cancel()` before it ran (Python's
 * `concurrent.futures.CancelledError`): `get()` throws it.
 *
 * @code
 * if (r.cancel()) assert(r.cancelled());  // r.get() now throws procpool::Cancelled
 * @endcode
 *
 * Immutable: thread-safe.
 */
class Cancelled : public Error {
 public:
  using Error::Error;
};

/**
 * Lets RemoteError::rethrow() (and `Options::raise_original_exceptions`)
 * raise a task's exception of type `E` as an `E` in the caller, made from its
 * message. Call it once, in the process that calls the pool; it is known by
 * its type's name, as the worker reports it.
 *
 * @code
 * procpool::register_exception<myapp::ParseError>();  // ParseError(const std::string&)
 * @endcode
 *
 * @tparam E a copyable class, not final, constructible from `const
 *         std::string&` (or by default: the message is then lost). Two types
 *         of the same name (in anonymous namespaces of two files) make that
 *         name unknown: such errors stay RemoteError.
 *
 * This function is thread-safe.
 */
template <class E>
void register_exception() {
  static_assert(std::is_class_v<E> && !std::is_final_v<E> && std::is_copy_constructible_v<E> &&
                    (std::is_constructible_v<E, const std::string&> || std::is_default_constructible_v<E>),
                "procpool::register_exception<E>: E must be a class that is not final (the RemoteError is "
                "nested in a class derived from it), copyable, and constructible from a std::string (its "
                "message) or by default");
  detail::ExceptionTypes::instance().add(detail::demangle(typeid(E).name()), typeid(E), &detail::throw_nested_as<E>);
}

}  // namespace procpool

#if PROCPOOL_DEFINE_ENGINE
namespace procpool {

PROCPOOL_ENGINE_INLINE std::exception_ptr RemoteError::original() const {
  const detail::ExceptionMaker make = detail::ExceptionTypes::instance().find(type_name_);
  if (make == nullptr) return std::make_exception_ptr(*this);
  try {
    try {
      throw *this;
    } catch (...) {
      make(message_);
    }
  } catch (...) {
    return std::current_exception();
  }
  return std::make_exception_ptr(*this);  // unreachable: make() throws
}

}  // namespace procpool
#endif

/// @file
/// A value or the error that took its place: procpool::Result.
#pragma once

#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <variant>

namespace procpool {

/**
 * One item's outcome, value or error, for going on past failures without
 * try/catch: what `IMap::results()` yields.
 *
 * @code
 * for (procpool::Result<long> r : pool.imap<parse>(files).results()) {
 *   if (r) total += *r; else log(r.error_message());
 * }
 * @endcode
 *
 * A plain value: as thread-safe as the T it holds.
 */
template <class T>
class Result {
 public:
  /// A successful outcome.
  explicit Result(T value) : outcome_(std::in_place_index<0>, std::move(value)) {}
  /// A failed outcome.
  /// @throws std::invalid_argument if `error` is empty.
  explicit Result(std::exception_ptr error) : outcome_(std::in_place_index<1>, std::move(error)) {
    if (!std::get<1>(outcome_)) throw std::invalid_argument("procpool::Result: an empty exception_ptr is no error");
  }

  /// Whether it holds a value.
  bool ok() const noexcept { return outcome_.index() == 0; }
  /// As ok().
  explicit operator bool() const noexcept { return ok(); }

  /**
   * The value.
   * @return the value held.
   * @throws the error held, if it failed (RemoteError, WorkerLost, ...).
   */
  T& value() & {
    if (!ok()) std::rethrow_exception(std::get<1>(outcome_));
    return std::get<0>(outcome_);
  }
  /// As value(), on a const Result.
  const T& value() const& {
    if (!ok()) std::rethrow_exception(std::get<1>(outcome_));
    return std::get<0>(outcome_);
  }
  /// As value(), moving the value out.
  T&& value() && {
    if (!ok()) std::rethrow_exception(std::get<1>(outcome_));
    return std::get<0>(std::move(outcome_));
  }
  /// value(). @return the value held.
  T& operator*() & { return value(); }
  /// value(). @return the value held.
  const T& operator*() const& { return value(); }
  /// Member access to value().
  T* operator->() { return std::addressof(value()); }
  /// Member access to value().
  const T* operator->() const { return std::addressof(value()); }

  /// The error, or an empty pointer if it holds a value.
  std::exception_ptr error() const noexcept { return ok() ? nullptr : std::get<1>(outcome_); }

  /// The error's what() (empty if it holds a value, or the error is not a std::exception).
  std::string error_message() const {
    if (ok()) return {};
    try {
      std::rethrow_exception(std::get<1>(outcome_));
    } catch (const std::exception& e) {
      return e.what();
    } catch (...) {
      return {};
    }
  }

 private:
  std::variant<T, std::exception_ptr> outcome_;
};

}  // namespace procpool

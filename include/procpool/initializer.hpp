/// @file
/// Code that runs once in each worker before its first task: procpool::Initializer.
#pragma once

#include <concepts>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/handlers.hpp"

namespace procpool {

namespace detail {
struct InitializerAccess;
}

/**
 * Code each worker runs once before its first task: Python's
 * `initializer`/`initargs`. Build one from a captureless lambda, a
 * serializable function object, or `procpool::initializer<fn>(args...)`.
 * Like tasks, it is named by its type, so it works under every start method.
 *
 * If it throws, the pool does not respawn workers to try again: every pending
 * and later task fails with `procpool::InitializerError`.
 *
 * Example:
 * @code
 * procpool::Pool pool({.initializer = [] { std::srand(42); }});
 * procpool::Pool pool2({.initializer = procpool::initializer<load_model>("model.bin")});
 * @endcode
 *
 * A value type without locks: const member functions may be called from
 * several threads at once; anything else needs the caller's synchronisation.
 */
class Initializer {
 public:
  /// No initializer.
  Initializer() = default;

  /**
   * From a captureless lambda or a default-constructible function object
   * that is empty or has serialize(); its state is sent to each worker.
   * @param fn called with no arguments in each worker; a type that cannot
   *        travel is a compile error.
   * @throws std::logic_error if `fn`'s type is named the same as another
   *         function's (internal linkage in two source files), so a worker
   *         could not tell them apart.
   */
  template <class F>
  requires(!std::same_as<std::remove_cvref_t<F>, Initializer> && std::invocable<std::remove_cvref_t<F>&>)
      Initializer(F&& fn) {  // NOLINT(google-explicit-constructor): `.initializer = [] {...}`
    using Fn = std::remove_cvref_t<F>;
    static_assert(detail::require_travelling_callable<Fn>::value);
    id_ = detail::Registered<detail::InitHandler<Fn>>::get();
    detail::HandlerRegistry::instance().require_unambiguous(id_);
    detail::Encoder encoder(state_, &shares_);
    detail::save_callable(encoder, fn);
  }

  /// Whether an initializer is set. @return false for a default-constructed one.
  explicit operator bool() const noexcept { return id_ != 0; }

 private:
  friend struct detail::InitializerAccess;
  std::uint64_t id_ = 0;
  std::vector<char> state_;
  detail::SharedStates shares_;  // SharedMemory blocks its arguments refer to
};

/**
 * An initializer that calls `Fn(args...)` in each worker; the arguments are
 * serialized once and sent to every worker (Python's `initargs`).
 *
 * @code
 * procpool::Pool pool({.initializer = procpool::initializer<load_model>("model.bin")});
 * @endcode
 *
 * @tparam Fn the function to call, named at compile time.
 * @param args its arguments; each must be serializable.
 * @return the initializer, for `Options::initializer`.
 * @throws std::logic_error as the `Initializer` constructor does.
 *
 * This function is thread-safe.
 */
template <auto Fn, class... Args>
Initializer initializer(Args&&... args) {
  return Initializer(detail::BoundCall<Fn, detail::travel_t<Args>...>{{std::forward<Args>(args)...}});
}

namespace detail {
struct InitializerAccess {
  static std::uint64_t id(const Initializer& init) { return init.id_; }
  static const std::vector<char>& state(const Initializer& init) { return init.state_; }
  static const SharedStates& shares(const Initializer& init) { return init.shares_; }
};
}  // namespace detail

}  // namespace procpool

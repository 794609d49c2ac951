// procpool - code that runs once in each worker before its first task.
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
 */
class Initializer {
 public:
  /// No initializer.
  Initializer() = default;

  /// From a captureless lambda or a default-constructible function object
  /// that is empty or has serialize(); its state is sent to each worker.
  template <class F>
  requires(!std::same_as<std::remove_cvref_t<F>, Initializer> && std::invocable<std::remove_cvref_t<F>&>)
      Initializer(F&& fn) {  // NOLINT(google-explicit-constructor): `.initializer = [] {...}`
    using Fn = std::remove_cvref_t<F>;
    static_assert(detail::require_travelling_callable<Fn>::value);
    id_ = detail::Registered<detail::InitHandler<Fn>>::id;
    detail::HandlerRegistry::instance().require_unambiguous(id_);
    detail::Encoder encoder(state_);
    detail::save_callable(encoder, fn);
  }

  /// Whether an initializer is set.
  explicit operator bool() const noexcept { return id_ != 0; }

 private:
  friend struct detail::InitializerAccess;
  std::uint64_t id_ = 0;
  std::vector<char> state_;
};

/**
 * An initializer that calls `Fn(args...)` in each worker; the arguments are
 * serialized once and sent to every worker (Python's `initargs`).
 */
template <auto Fn, class... Args>
Initializer initializer(Args&&... args) {
  return Initializer(detail::BoundCall<Fn, detail::travel_t<Args>...>{{std::forward<Args>(args)...}});
}

namespace detail {
struct InitializerAccess {
  static std::uint64_t id(const Initializer& init) { return init.id_; }
  static const std::vector<char>& state(const Initializer& init) { return init.state_; }
};
}  // namespace detail

}  // namespace procpool

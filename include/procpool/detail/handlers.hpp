// procpool - the code a worker runs for a task, one handler type per
// (function, argument type) pair, plus the checks that make a function or
// type that cannot travel a compile error.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>

#include "registry.hpp"
#include "serialize.hpp"

namespace procpool::detail {

/// A function named by template argument, `map<square>`, wrapped in an empty
/// type so it is identified by its type like every other callable.
template <auto Fn>
struct FnConst {
  template <class... A>
  decltype(auto) operator()(A&&... args) const {
    return std::invoke(Fn, std::forward<A>(args)...);
  }
};

template <class F>
inline constexpr bool stateless_v = std::is_empty_v<F>&& std::is_default_constructible_v<F>;

template <class F>
struct require_travelling_callable {
  static_assert(stateless_v<F> || (std::is_default_constructible_v<F> && travels_v<F>),
                "procpool: this function object cannot be sent to a worker. A callable must either "
                "have no state (a function named as a template argument, a captureless lambda, an "
                "empty struct) or be a default-constructible struct with a serialize() member. "
                "Lambdas with captures cannot travel: capture nothing and pass the data as "
                "arguments, or write a struct with the data as fields and serialize() them.");
  static constexpr bool value = true;
};

template <class F>
void save_callable(Encoder& out, const F& fn) {
  if constexpr (!stateless_v<F>) out(fn);
}

template <class F>
F load_callable(Decoder& in) {
  if constexpr (stateless_v<F>) {
    return F{};
  } else {
    F fn{};
    in(fn);
    return fn;
  }
}

/// What the worker calls with: the item moved in (or, for starmap/apply, its
/// tuple, pair or array unpacked).
template <class F, class Arg, bool Star>
struct call_traits {
  using result = std::invoke_result_t<F&, Arg&&>;
};
template <class F, class Arg>
struct call_traits<F, Arg, true> {
  using result = decltype(std::apply(std::declval<F&>(), std::declval<Arg&&>()));
};

/// How an argument of type T travels: by value, and a C string as std::string
/// (a pointer cannot cross into another process).
template <class T>
using travel_t =
    std::conditional_t<std::is_same_v<std::decay_t<T>, const char*> || std::is_same_v<std::decay_t<T>, char*>,
                       std::string, std::decay_t<T>>;

/// Result a call produces on the parent side: void becomes std::monostate (Python's None).
template <class R>
using stored_t = std::conditional_t<std::is_void_v<R>, std::monostate, std::decay_t<R>>;

inline std::string current_exception_message() {
  try {
    throw;
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return {};
  }
}

/// Per-item outcome on the wire: `true, value` or `false, type name, message`.
inline void write_current_failure(Encoder& out) {
  out(false, current_exception_type_name(), current_exception_message());
}

template <class F, class Arg, bool Star>
struct CallHandler {
  using Result = typename call_traits<F, Arg, Star>::result;

  static void run(Decoder& in, std::uint32_t count, Encoder& out) {
    std::uint32_t i = 0;
    try {
      F fn = load_callable<F>(in);
      for (; i < count; ++i) {
        Arg arg{};
        in(arg);  // a decode failure leaves the stream unusable: fail the rest below
        std::size_t mark = out.size();
        try {
          if constexpr (std::is_void_v<Result>) {
            invoke(fn, std::move(arg));
            out(true);
          } else {
            Result result = invoke(fn, std::move(arg));
            out(true);
            out(static_cast<const stored_t<Result>&>(result));
          }
        } catch (...) {
          out.truncate(mark);  // drop a half-written result
          write_current_failure(out);
        }
      }
    } catch (...) {
      for (; i < count; ++i) write_current_failure(out);
    }
  }

 private:
  static decltype(auto) invoke(F& fn, Arg&& arg) {
    if constexpr (Star) {
      return std::apply(fn, std::move(arg));
    } else {
      return std::invoke(fn, std::move(arg));
    }
  }
};

/// Handler id for calling F on items of type Arg; instantiating it checks that
/// everything involved can travel.
template <class F, class Arg, bool Star>
std::uint64_t call_handler_id() {
  static_assert(require_travelling_callable<F>::value);
  static_assert(require_serializable<Arg>::value);
  using Result = typename call_traits<F, Arg, Star>::result;
  static_assert(require_serializable<stored_t<Result>>::value);
  const std::uint64_t id = Registered<CallHandler<F, Arg, Star>>::id;
  HandlerRegistry::instance().require_unambiguous(id);
  return id;
}

/// Runs an initializer; its exception propagates to the worker loop.
template <class F>
struct InitHandler {
  static void run(Decoder& in, std::uint32_t, Encoder&) {
    F fn = load_callable<F>(in);
    fn();
  }
};

/// `procpool::initializer<setup>(args...)`: a function plus arguments that travel.
template <auto Fn, class... Args>
struct BoundCall {
  static_assert((require_serializable<Args>::value && ...));
  std::tuple<Args...> args;
  void operator()() { std::apply(Fn, args); }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(args);
  }
};

}  // namespace procpool::detail

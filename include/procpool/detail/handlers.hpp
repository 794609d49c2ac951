// procpool - the code a worker runs for a task, one handler type per
// (function, argument type) pair, plus the checks that make a function or
// type that cannot travel a compile error.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <new>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "config.hpp"
#include "protocol.hpp"
#include "registry.hpp"
#include "serialize.hpp"

namespace procpool {
template <class... Ts>
struct Zipped;
}  // namespace procpool

namespace procpool::detail {

/// A function named by template argument, `map<square>`, wrapped in an empty
/// type so it is identified by its type like every other callable.
template <auto Fn>
struct FnConst {
  template <class... A>
  requires std::is_invocable_v<decltype(Fn), A...>
  decltype(auto) operator()(A&&... args) const { return std::invoke(Fn, std::forward<A>(args)...); }
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

/// A callable that cannot travel is not handed to the archives:
/// require_travelling_callable has said why, and they would say it again.
template <class F>
inline constexpr bool sent_as_state_v = !stateless_v<F> && std::is_default_constructible_v<F> && travels_v<F>;

template <class F>
void save_callable(Encoder& out, const F& fn) {
  if constexpr (sent_as_state_v<F>) out(fn);
}

template <class F>
F load_callable(Decoder& in) {
  if constexpr (sent_as_state_v<F>) {
    F fn{};
    in(fn);
    return fn;
  } else if constexpr (std::is_default_constructible_v<F>) {
    return F{};
  } else {
    std::terminate();  // unreachable: require_travelling_callable failed the build
  }
}

/// An item whose `values` (a tuple) are the function's arguments, whatever
/// the call: procpool::zip's items.
template <class Arg>
concept unpacked_item = requires {
  typename Arg::procpool_unpacked;
};

/// Whether F can be called with the elements of the tuple-like `Tuple` (an rvalue).
template <class F, class Tuple>
constexpr bool applicable() {
  using T = std::remove_cvref_t<Tuple>;
  if constexpr (requires { std::tuple_size<T>::value; }) {
    return []<std::size_t... I>(std::index_sequence<I...>) {
      return std::is_invocable_v<F&, decltype(std::get<I>(std::declval<T&&>()))...>;
    }
    (std::make_index_sequence<std::tuple_size_v<T>>{});
  } else {
    return false;
  }
}

/// Whether the worker can call F with an Arg (see call_traits).
template <class F, class Arg, bool Star>
constexpr bool callable_with() {
  if constexpr (unpacked_item<Arg>) {
    return applicable<F, decltype(std::declval<Arg&&>().values)>();
  } else if constexpr (Star) {
    return applicable<F, Arg>();
  } else {
    return std::is_invocable_v<F&, Arg&&>;
  }
}

template <class F, class Arg, bool Star>
struct require_callable {
  static_assert(callable_with<F, Arg, Star>(),
                "procpool: the function cannot be called with the call's items. map, imap and "
                "apply with one argument call f(item); starmap, apply with several and zip's items "
                "call f(a, b, ...) with the item's tuple, pair or array unpacked. Check the number "
                "and types of the function's parameters. A parameter T& cannot bind to a value "
                "received from another process: take T or const T&. A const char* arrives as a "
                "std::string: take std::string or std::string_view. apply_async takes its "
                "callbacks wrapped, after the arguments: procpool::callbacks(on_value, on_error). "
                "The item type is the Arg in "
                "'require_callable<F, Arg, Star>' in this message's instantiation context.");
  static constexpr bool value = true;
};

template <class F, class Arg, bool Star>
constexpr auto call_result() {
  if constexpr (!callable_with<F, Arg, Star>()) {
    static_assert(require_callable<F, Arg, Star>::value);
    return std::type_identity<int>{};  // the assertion has said why; nothing more fails
  } else if constexpr (unpacked_item<Arg>) {
    return std::type_identity<decltype(std::apply(std::declval<F&>(), std::declval<Arg&&>().values))>{};
  } else if constexpr (Star) {
    return std::type_identity<decltype(std::apply(std::declval<F&>(), std::declval<Arg&&>()))>{};
  } else {
    return std::type_identity<std::invoke_result_t<F&, Arg&&>>{};
  }
}

/// What the worker calls with: the item moved in (or, for starmap/apply, its
/// tuple, pair or array unpacked; for procpool::zip's items, always unpacked).
template <class F, class Arg, bool Star>
struct call_traits {
  using result = typename decltype(call_result<F, Arg, Star>())::type;
};

/// The type an input item travels as: what the worker can rebuild. A
/// std::map's `pair<const K, V>` goes as `pair<K, V>`, a string literal
/// (`const char*`, which points into this process) as a std::string; so
/// do the elements of pairs, tuples and procpool::zip's items.
template <class T>
struct wire {
  using type = T;
};
template <class T>
using wire_t = typename wire<T>::type;
template <>
struct wire<const char*> {
  using type = std::string;
};
template <>
struct wire<char*> {
  using type = std::string;
};
template <class A, class B>
struct wire<std::pair<A, B>> {
  using type = std::pair<wire_t<std::remove_const_t<A>>, wire_t<std::remove_const_t<B>>>;
};
template <class... Ts>
struct wire<std::tuple<Ts...>> {
  using type = std::tuple<wire_t<std::remove_const_t<Ts>>...>;
};
template <class... Ts>
struct wire<Zipped<Ts...>> {
  using type = Zipped<wire_t<std::remove_const_t<Ts>>...>;
};

/// How an argument of type T travels: by value, as its wire_t.
template <class T>
using travel_t = wire_t<std::decay_t<T>>;

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

/// "type: message" of the exception being handled; "type" alone when its
/// message is empty (`throw 42`).
PROCPOOL_ENGINE_INLINE std::string current_exception_summary();

/// "a map callback", "an apply_async callback".
PROCPOOL_ENGINE_INLINE std::string with_article(std::string_view word);

/// Tells stderr that a user's callback threw the exception being handled:
/// "procpool: a map_async done callback threw <type: message>; the pool goes on".
PROCPOOL_ENGINE_INLINE void report_callback_exception(std::string_view call, std::string_view callback,
                                                      std::string_view goes_on) noexcept;

/// Per-item outcome on the wire (protocol.hpp's ItemOutcome): `value, the
/// value` or `raised, type name, message`.
/// In a worker: where it says which item it runs (ClaimArea::running_word),
/// and the running task's part of that word. Null without a claim area.
struct RunningItem {
  std::atomic<std::uint64_t>* word = nullptr;
  std::uint64_t task = 0;
  void at(std::uint32_t item) const noexcept {
    if (word != nullptr) word->store(task | item, std::memory_order_relaxed);
  }
};
inline RunningItem& running_item() {
  static RunningItem running;
  return running;
}

/// In a worker: whether a task threw std::bad_alloc since the flag was last
/// taken (after_task takes it).
inline bool& task_ran_out_of_memory() {
  static bool ran_out = false;
  return ran_out;
}
/// In a worker with a memory_limit_per_child: says so, for its bad_allocs.
inline std::string& memory_limit_note() {
  static std::string note;
  return note;
}

PROCPOOL_ENGINE_INLINE void write_current_failure(Encoder& out);

// ---- argument storage kept for the next item ----------------------------------
// A worker decodes each item into a new argument. For a large byte buffer
// that is fresh memory every time: each page faults and is zeroed before the
// copy lands, which costs several times the copy. Arguments that are vectors
// of numbers or byte strings (whose loads overwrite them whole, so no state
// of the previous item can leak into the next) are instead decoded into the
// storage the last item left behind: the argument itself, if the function
// took it by reference, or the result, if the function returned that type
// (an echo, a buffer transformed in place).

/// Storage smaller than this is not kept: the heap reuses it as cheaply.
inline constexpr std::size_t spare_min_bytes = std::size_t{64} << 10;
/// Nor larger than this, so a worker holds at most this much per argument type.
inline constexpr std::size_t spare_max_bytes = std::size_t{256} << 20;

template <class T>
struct keeps_storage : std::false_type {};
template <class T>
struct keeps_storage<std::vector<T>> : std::bool_constant<std::is_arithmetic_v<T> && !std::is_same_v<T, bool>> {};
template <class C, class Tr>
struct keeps_storage<std::basic_string<C, Tr>> : std::bool_constant<cereal::procpool_byte_sized<C>> {};

/// How to let go of each argument type's kept storage (see spare_slot).
struct SpareReleasers {
  std::mutex mutex;
  std::vector<void (*)()> releasers;
};
inline SpareReleasers& spare_releasers() {
  static SpareReleasers releasers;
  return releasers;
}
/// Whether any argument storage may be kept.
inline bool have_spares() {
  std::lock_guard lock(spare_releasers().mutex);
  return !spare_releasers().releasers.empty();
}
/// Lets go of every argument's kept storage: when the worker has waited a
/// while for work, and before it measures itself against max_memory_per_child.
inline void release_spares() {
  std::lock_guard lock(spare_releasers().mutex);
  for (auto release : spare_releasers().releasers) release();
}

/// The storage kept for the next argument of type Arg (a keeps_storage
/// type). A worker runs one task at a time; so does each slot's user.
template <class Arg>
Arg& spare_slot() {
  static Arg& slot = []() -> Arg& {
    static Arg storage;
    std::lock_guard lock(spare_releasers().mutex);
    spare_releasers().releasers.push_back([] { Arg().swap(spare_slot<Arg>()); });
    return storage;
  }();
  return slot;
}

/// Decodes the next argument into the kept storage. An item much smaller than
/// that storage gets storage of its own, and the large one stays kept: the
/// function never sees more capacity than about twice what it was given.
template <class Arg>
void decode_into_spare(Decoder& in, Arg& arg) {
  arg.swap(spare_slot<Arg>());
  in(arg);
  if (arg.capacity() * sizeof(typename Arg::value_type) >= spare_min_bytes && arg.capacity() / 2 > arg.size()) {
    Arg own(arg.begin(), arg.end());
    arg.swap(own);
    spare_slot<Arg>().swap(own);
  }
}

/// Keeps `value`'s storage for the next argument if it is worth keeping and
/// larger than what is kept.
template <class Arg>
void keep_spare(Arg& value) {
  const std::size_t bytes = value.capacity() * sizeof(typename Arg::value_type);
  if (bytes < spare_min_bytes || bytes > spare_max_bytes) return;
  Arg& slot = spare_slot<Arg>();
  if (value.capacity() > slot.capacity()) slot.swap(value);
}

template <class F, class Arg, bool Star>
struct CallHandler {
  using Result = typename call_traits<F, Arg, Star>::result;
  static constexpr bool reuse = keeps_storage<Arg>::value;

  static void run(Decoder& in, std::uint32_t count, Encoder& out) {
    std::uint32_t i = 0;
    try {
      F fn = load_callable<F>(in);
      for (; i < count; ++i) {
        running_item().at(i);
        Arg arg{};
        // A decode failure leaves the stream unusable: fail the rest below.
        if constexpr (reuse) {
          decode_into_spare(in, arg);
        } else {
          in(arg);
        }
        std::size_t mark = out.size();
        try {
          if constexpr (std::is_void_v<Result>) {
            invoke(fn, std::move(arg));
            out(outcome_byte(ItemOutcome::value));
          } else {
            Result result = invoke(fn, std::move(arg));
            out(outcome_byte(ItemOutcome::value));
            out(static_cast<const stored_t<Result>&>(result));
            if constexpr (reuse && std::is_same_v<Result, Arg>) keep_spare(result);
          }
          if constexpr (reuse) keep_spare(arg);  // still whole if the function took a reference
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
    if constexpr (!callable_with<F, Arg, Star>()) {
      return Result{};  // unreachable: require_callable failed the build
    } else if constexpr (unpacked_item<Arg>) {
      return std::apply(fn, std::move(arg.values));
    } else if constexpr (Star) {
      return std::apply(fn, std::move(arg));
    } else {
      return std::invoke(fn, std::move(arg));
    }
  }
};

/// Checks that a call's items can travel: the elements of a tuple (apply's
/// and starmap's arguments) each on its own, so that the compiler's message
/// names the type that cannot, not the tuple holding it.
template <class Arg>
struct require_item {
  static constexpr bool value = require_each_serializable<Arg>::value && require_default_constructible<Arg>::value;
};
template <class... T>
struct require_item<std::tuple<T...>> {
  // The tuple itself too: one holding a reference cannot be made empty.
  static constexpr bool value =
      (require_item<std::remove_cvref_t<T>>::value && ...) && require_default_constructible<std::tuple<T...>>::value;
};

/// Handler id for calling F on items of type Arg; instantiating it checks that
/// everything involved can travel.
template <class F, class Arg, bool Star>
std::uint64_t call_handler_id() {
  static_assert(require_travelling_callable<F>::value);
  static_assert(require_item<Arg>::value);
  using Result = typename call_traits<F, Arg, Star>::result;
  static_assert(require_each_serializable<stored_t<Result>>::value &&
                require_default_constructible<stored_t<Result>>::value);
  if constexpr (!value_initializable<Arg>) return 0;  // the assertion has said why
  const std::uint64_t id = Registered<CallHandler<F, Arg, Star>>::get();
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

#if PROCPOOL_DEFINE_ENGINE
#include <fmt/format.h>

namespace procpool::detail {

PROCPOOL_ENGINE_INLINE std::string current_exception_summary() {
  std::string message = current_exception_message();
  return message.empty() ? current_exception_type_name() : current_exception_type_name() + ": " + message;
}

PROCPOOL_ENGINE_INLINE std::string with_article(std::string_view word) {
  const bool vowel = !word.empty() && std::string_view("aeiouAEIOU").find(word.front()) != std::string_view::npos;
  return (vowel ? "an " : "a ") + std::string(word);
}

PROCPOOL_ENGINE_INLINE void report_callback_exception(std::string_view call, std::string_view callback,
                                                      std::string_view goes_on) noexcept {
  try {
    fmt::print(stderr, "procpool: {} {} threw {}; {}\n", with_article(call), callback, current_exception_summary(),
               goes_on);
  } catch (...) {  // out of memory, or stderr closed: nothing to be done
  }
}

PROCPOOL_ENGINE_INLINE void write_current_failure(Encoder& out) {
  std::string message = current_exception_message();
  try {
    throw;
  } catch (const std::bad_alloc&) {
    task_ran_out_of_memory() = true;
    if (!memory_limit_note().empty()) message += " (" + memory_limit_note() + ")";
  } catch (...) {
  }
  out(outcome_byte(ItemOutcome::raised), current_exception_type_name(), message);
}

}  // namespace procpool::detail
#endif

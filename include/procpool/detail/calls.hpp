// procpool - the engine behind Pool's calls: encoding the input into task
// frames, submitting them in batches under the map's byte bound, and making
// the AsyncResult, IMap or result vector the call returns. pool.hpp declares
// the API; each of its calls ends here.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../async_result.hpp"
#include "../call_options.hpp"
#include "../errors.hpp"
#include "../imap.hpp"
#include "../options.hpp"
#include "config.hpp"
#include "engine.hpp"
#include "handlers.hpp"
#include "ranges.hpp"

namespace procpool::detail {

/// The type an input item travels as (see wire).
template <class R>
using item_t = wire_t<std::remove_cvref_t<std::ranges::range_value_t<R>>>;

/// The value a call with callable F on items of type Arg yields on the parent side.
template <class F, class Arg, bool Star>
using result_of_t = stored_t<typename call_traits<F, Arg, Star>::result>;

template <class T>
inline constexpr bool is_pair_v = false;
template <class A, class B>
inline constexpr bool is_pair_v<std::pair<A, B>> = true;
template <class T>
inline constexpr bool is_zipped_v = false;
template <class... Ts>
inline constexpr bool is_zipped_v<Zipped<Ts...>> = true;

/// Encodes `value` as its wire type Arg. A std::map's `pair<const K, V>`
/// has the bytes of `pair<K, V>`: its members are encoded in place, not
/// copied into one (a map of vectors would copy every vector). So do
/// procpool::zip's items.
template <class Arg, class T>
void encode_as(Encoder& encoder, const T& value) {
  if constexpr (std::is_same_v<T, Arg>) {
    encoder(value);
  } else if constexpr (is_pair_v<T> && is_pair_v<Arg>) {
    encode_as<typename Arg::first_type>(encoder, value.first);
    encode_as<typename Arg::second_type>(encoder, value.second);
  } else if constexpr (is_zipped_v<T> && is_zipped_v<Arg>) {
    using Values = decltype(Arg::values);
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (encode_as<std::tuple_element_t<I, Values>>(encoder, std::get<I>(value.values)), ...);
    }
    (std::make_index_sequence<std::tuple_size_v<Values>>{});
  } else {
    const Arg& converted = value;
    encoder(converted);
  }
}

/// Appends the callable and up to `max_items` items to a task frame. If the
/// input throws, the items read before it stay in the frame and the
/// exception is stored in `error` (or rethrown when `error` is null and no
/// item was read).
template <class F, class Arg, class It, class End>
std::uint32_t encode_items(TaskBytes& frame, SharedStates& shares, const F& fn, It& it, const End& end,
                           std::size_t max_items, std::exception_ptr* error = nullptr) {
  std::uint32_t count = 0;
  Encoder encoder(frame, &shares);
  save_callable(encoder, fn);
  std::size_t mark = frame.size();
  try {
    while (count < max_items && it != end) {
      encode_as<Arg>(encoder, *it);
      ++count;
      mark = frame.size();
      ++it;
    }
  } catch (...) {
    if (error == nullptr) throw;
    frame.resize(mark);  // drop a half-encoded item
    *error = std::current_exception();
  }
  return count;
}

/// imap's input: owns an rvalue range (or refers to an lvalue one) and
/// reads it only when the consumer asks for more.
template <class View, class F, class Arg, bool Star>
class RangeSource final : public ChunkSource {
 public:
  RangeSource(View view, F fn) : view_(std::move(view)), fn_(std::move(fn)) {}
  std::uint32_t fill(TaskBytes& frame, SharedStates& shares, std::size_t max_items) override {
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    if (!it_) it_.emplace(std::ranges::begin(view_));
    auto count = encode_items<F, Arg>(frame, shares, fn_, *it_, std::ranges::end(view_), max_items, &error_);
    // Items read before a failure are sent; the failure surfaces next time.
    if (count == 0 && error_) std::rethrow_exception(std::exchange(error_, nullptr));
    return count;
  }
  std::uint64_t handler_id() const override { return call_handler_id<F, Arg, Star>(); }

 private:
  View view_;
  F fn_;
  std::optional<std::ranges::iterator_t<View>> it_;
  std::exception_ptr error_;
};

/// Python's default map chunksize: ceil(n / (4 * processes)).
inline std::size_t default_chunksize(std::size_t count, std::size_t processes) {
  if (count == 0) return 1;
  std::size_t chunksize = count / (processes * 4);
  if (count % (processes * 4) != 0) ++chunksize;
  return chunksize;
}

/// Whether a call's arguments start with its CallOptions (apply, apply_async).
template <class... Args>
inline constexpr bool options_first = false;
template <class A, class... Rest>
inline constexpr bool options_first<A, Rest...> = std::is_same_v<std::remove_cvref_t<A>, CallOptions>;

template <class>
inline constexpr bool always_false = false;

/// A second argument of map_async that is neither a chunksize nor
/// CallOptions: a callback in Python's place (map_async(f, xs, callback=cb)).
template <class C>
concept misplaced_callback = !std::is_convertible_v<C, std::size_t> && !std::is_convertible_v<C, const CallOptions&>;

/// Instantiated by map_async<f>(items, callback) (Python's order).
template <class Callback>
struct refuse_callback_position {
  static_assert(always_false<Callback>,
                "procpool: map_async and starmap_async take their callbacks after the chunksize (0 for the "
                "default): pool.map_async<f>(items, 0, callback, error_callback), or after CallOptions: "
                "pool.map_async<f>(items, {.chunksize = 8}, callback).");
  static constexpr bool value = true;
};

/// Instantiated by Pool's calls given a function pointer (pool.map(f, xs)).
template <class Ret>
struct refuse_function_pointer {
  static_assert(always_false<Ret>,
                "procpool: pass a function as a template argument, pool.map<f>(items), not as an "
                "argument, pool.map(f, items): a worker finds the code by its type, never by its "
                "address, which differs between processes. A captureless lambda or a function object "
                "may be passed as an argument.");
  static constexpr bool value = true;
};

/// A call's callback (`for_error`: its error_callback) as its state holds
/// it; one clear error for a callable that cannot take what it is given.
template <class Function, bool for_error, class C>
Function state_callback(C callback) {
  if constexpr (std::is_null_pointer_v<C>) {
    return {};
  } else if constexpr (std::is_constructible_v<Function, C>) {
    return Function(std::move(callback));
  } else if constexpr (for_error) {
    static_assert(always_false<C>,
                  "procpool: an error_callback is called with a `const procpool::Error&`: the error get() "
                  "would throw, a RemoteError, WorkerLost or TaskTimeout (all derive from procpool::Error; "
                  "dynamic_cast tells them apart). Take `const procpool::Error&` or `const std::exception&`.");
    return {};
  } else {
    static_assert(always_false<C>,
                  "procpool: a callback is called with the call's result as a const reference: `const T&` "
                  "for apply_async (T is what the function returns; std::monostate for void), "
                  "`const std::vector<T>&` for map_async and starmap_async. This callback cannot take that.");
    return {};
  }
}

template <class F>
concept callable_object = std::is_class_v<std::remove_cvref_t<F>> && !std::ranges::range<F>;

template <class T>
inline constexpr bool is_callbacks = false;
template <class A, class B>
inline constexpr bool is_callbacks<Callbacks<A, B>> = true;
/// Whether apply_async's last argument is its Callbacks.
template <class... Args>
inline constexpr bool ends_with_callbacks = false;
template <class A, class... Rest>
inline constexpr bool ends_with_callbacks<A, Rest...> =
    is_callbacks<std::remove_cvref_t<std::tuple_element_t<sizeof...(Rest), std::tuple<A, Rest...>>>>;

/// What a Pool holds: its dispatcher and the settings its calls need.
class Calls {
 public:
  Calls() = default;
  /// Makes the pool's transport, then its dispatcher with
  /// `options.processes` resolved.
  static Calls open(Options options);

  /// A system call failed as the pool started: says so, and what to do
  /// when the process is out of file descriptors.
  [[noreturn]] static void throw_start_error(const std::system_error& e);

  /// Why a pool without a dispatcher takes no call (live()).
  [[noreturn]] void throw_not_live() const;

  /// `options.processes` is resolved (not 0).
  Calls(const Options& options, std::unique_ptr<Transport> transport);

  Engine* dispatcher() const noexcept { return dispatcher_.get(); }
  /// The dispatcher, for a call. A dormant pool (open) in a process whose
  /// main() forgot procpool::init stops that process with the hint.
  const std::shared_ptr<Engine>& live() const {
    if (dispatcher_ == nullptr) throw_not_live();
    dispatcher_->require_owner();
    return dispatcher_;
  }
  std::size_t processes() const noexcept { return processes_; }

  /// How long a map encodes chunks before it submits them, at most.
  static constexpr std::chrono::milliseconds batch_time{20};

  template <class C>
  static auto to_callback(C callback) {
    if constexpr (std::is_null_pointer_v<C>) {
      return nullptr;
    } else {
      return callback;
    }
  }

  /// Submits a batch of a map's chunks. A synchronous map first decodes the
  /// results ready, then waits until the batch fits beside its chunks not yet
  /// answered under `imap_prefetch_bytes`, or fewer chunks are out than the
  /// workers may hold plus one each.
  template <class T>
  static void submit_batch(detail::Engine& dispatcher, std::size_t prefetch_bytes, detail::MapState<T>& state,
                           std::vector<detail::Chunk>& batch, bool synchronous) {
    if (synchronous && prefetch_bytes != 0) {
      std::vector<std::size_t> sizes;
      std::size_t total = 0;
      for (const auto& chunk : batch) {
        sizes.push_back(chunk.frame.size());
        total += chunk.frame.size();
      }
      state.collect_ready();
      // The map decodes its results itself: only its task bytes count.
      // Beyond the bound, still one chunk a worker more than the workers may
      // hold: tasks queued behind a long one never stop the others' work.
      state.wait_room({.bytes = prefetch_bytes,
                       .floor = dispatcher.processes() * (dispatcher.max_tasks_per_worker() + 1)},
                      total);
      state.sending(batch.front().index, sizes);
    }
    dispatcher.submit_from(batch, true);
  }

  /// Encodes and submits a map's chunks. `synchronous`: for map/starmap,
  /// which collect() next; they keep at most `imap_prefetch_bytes` of task
  /// messages waiting for their results (map_async returns once all are
  /// submitted).
  template <bool Star, class F, class R, class Callback, class ErrorCallback>
  auto submit_map(std::string_view call, F fn, R&& items, const CallOptions& options, Callback callback,
                  ErrorCallback error_callback, bool synchronous = false) {
    using Arg = detail::item_t<R>;
    using T = detail::result_of_t<F, Arg, Star>;
    if constexpr (!std::ranges::sized_range<R>) {
      // Python's map reads the whole input first too; imap is the lazy one.
      std::vector<Arg> all;
      for (auto&& item : items) all.emplace_back(std::forward<decltype(item)>(item));
      return submit_map<Star>(call, std::move(fn), all, options, std::move(callback), std::move(error_callback),
                              synchronous);
    } else {
      // What the call needs of the pool, taken now: the Pool may be destroyed
      // by another thread while this one encodes (the call then ends with
      // PoolNotRunning); the dispatcher lives on while the call holds it.
      const std::shared_ptr<detail::Engine> dispatcher = live();
      const std::size_t prefetch_bytes = prefetch_bytes_;
      const std::uint64_t handler = detail::call_handler_id<F, Arg, Star>();
      const auto count = static_cast<std::size_t>(std::ranges::size(items));
      std::size_t chunksize = options.chunksize;
      // map_async has no thread to size chunks as results come: adaptive means the default there.
      if (chunksize == 0 || chunksize == adaptive)
        chunksize = detail::default_chunksize(count, dispatcher->processes());
      auto state = std::make_shared<detail::MapState<T>>(call, count, chunksize);
      state->configure(options, count);
      state->set_raise_original(raise_original_);
      if constexpr (!std::is_null_pointer_v<Callback> || !std::is_null_pointer_v<ErrorCallback>) {
        using State = detail::AsyncState<std::vector<T>>;
        state->set_callbacks(detail::state_callback<typename State::Callback, false>(std::move(callback)),
                             detail::state_callback<typename State::ErrorCallback, true>(std::move(error_callback)));
      }
      if (count == 0) {
        // Nothing to send: a pool that is not running still refuses the call,
        // and the call is complete at once (its callbacks run now).
        dispatcher->require_running();
        detail::AsyncState<std::vector<T>>::complete_without_chunks(state, *dispatcher);
        return state;
      }
      // Chunks go to the workers in batches as they are encoded, so the
      // first run while the rest are still being encoded. The stream keeps
      // a close() from another thread from refusing the later batches.
      // A synchronous map's batches also stay under its byte bound.
      const std::size_t batch_bytes =
          synchronous && prefetch_bytes != 0 ? std::min(std::size_t{1} << 20, prefetch_bytes) : std::size_t{1} << 20;
      dispatcher->open_stream();
      struct StreamEnd {
        detail::Engine& dispatcher;
        ~StreamEnd() { dispatcher.close_stream(); }
      } stream_end{*dispatcher};
      std::vector<detail::Chunk> batch;
      std::size_t bytes = 0;
      auto stopped = [&] {
        return PoolNotRunning(fmt::format("procpool: the pool was terminated while {} read its input", call));
      };
      try {
        auto it = std::ranges::begin(items);
        auto end = std::ranges::end(items);
        auto batch_began = detail::Clock::now();
        for (std::uint64_t index = 0; it != end; ++index) {
          // A pool terminated meanwhile: the input is read no further.
          if (dispatcher->terminated()) throw stopped();
          detail::Chunk chunk{state, index, dispatcher->new_frame(), {}};
          std::size_t start = detail::begin_task_frame(chunk.frame, handler);
          auto n = detail::encode_items<F, Arg>(chunk.frame, chunk.shares, fn, it, end, chunksize);
          detail::finish_task_frame(chunk.frame, start, n);
          bytes += chunk.frame.size();
          batch.push_back(std::move(chunk));
          // A batch goes at 1 MiB, or after batch_time for an input slow to
          // read: the workers start meanwhile.
          if (bytes >= batch_bytes || detail::Clock::now() - batch_began >= batch_time) {
            submit_batch(*dispatcher, prefetch_bytes, *state, batch, synchronous);
            bytes = 0;
            batch_began = detail::Clock::now();
          }
        }
        if (!batch.empty()) submit_batch(*dispatcher, prefetch_bytes, *state, batch, synchronous);
      } catch (const PoolNotRunning&) {
        // Terminated between the check above and a submission: the same news.
        state->cancel();
        if (dispatcher->terminated()) throw stopped();
        throw;
      } catch (...) {
        // An item that failed to encode, or a pool terminated meanwhile: the
        // chunks already queued are dropped, and the caller gets the error.
        state->cancel();
        throw;
      }
      return state;
    }
  }

  template <class F, class... Args>
  auto make_apply_async(std::string_view call, const CallOptions& options, F fn, Args&&... args) {
    if constexpr (detail::ends_with_callbacks<Args...>) {
      // The last argument is the call's callbacks, not the function's.
      auto all = std::forward_as_tuple(std::forward<Args>(args)...);
      auto& callbacks = std::get<sizeof...(Args) - 1>(all);
      return [&]<std::size_t... I>(std::index_sequence<I...>) {
        return make_apply_async_with(call, options, std::move(fn), std::move(callbacks.on_value),
                                     std::move(callbacks.on_error), std::get<I>(std::move(all))...);
      }
      (std::make_index_sequence<sizeof...(Args) - 1>{});
    } else {
      return make_apply_async_with(call, options, std::move(fn), nullptr, nullptr, std::forward<Args>(args)...);
    }
  }

  template <class F, class OnValue, class OnError, class... Args>
  auto make_apply_async_with(std::string_view call, const CallOptions& options, F fn, OnValue on_value,
                             OnError on_error, Args&&... args) {
    using Arg = std::tuple<detail::travel_t<Args>...>;
    using Raw = typename detail::call_traits<F, Arg, true>::result;
    using R = std::conditional_t<std::is_void_v<Raw>, void, std::decay_t<Raw>>;
    return detail::AsyncAccess<R>::make(submit_apply(call, options, std::move(fn), std::move(on_value),
                                                     std::move(on_error), std::forward<Args>(args)...));
  }

  /// Submits one apply task, with its callbacks (nullptr for none).
  template <class F, class OnValue, class OnError, class... Args>
  auto submit_apply(std::string_view call, const CallOptions& options, F fn, OnValue on_value, OnError on_error,
                    Args&&... args) {
    using Arg = std::tuple<detail::travel_t<Args>...>;
    using T = detail::result_of_t<F, Arg, true>;
    const std::uint64_t handler = detail::call_handler_id<F, Arg, true>();
    const std::shared_ptr<detail::Engine> dispatcher = live();  // as in submit_map
    auto state = std::make_shared<detail::ApplyState<T>>(call);
    state->configure(options, 1);
    state->set_raise_original(raise_original_);
    if constexpr (!std::is_null_pointer_v<OnValue> || !std::is_null_pointer_v<OnError>) {
      using State = detail::AsyncState<T>;
      state->set_callbacks(detail::state_callback<typename State::Callback, false>(std::move(on_value)),
                           detail::state_callback<typename State::ErrorCallback, true>(std::move(on_error)));
    }
    detail::Chunk chunk{state, 0, dispatcher->new_frame(), {}};
    std::size_t start = detail::begin_task_frame(chunk.frame, handler);
    {
      detail::Encoder encoder(chunk.frame, &chunk.shares);
      detail::save_callable(encoder, fn);
      encoder(Arg(std::forward<Args>(args)...));
    }
    detail::finish_task_frame(chunk.frame, start, 1);
    std::vector<detail::Chunk> chunks;
    chunks.push_back(std::move(chunk));
    dispatcher->submit(std::move(chunks));
    return state;
  }

  /// map/starmap with adaptive chunking: chunks are sized as results come
  /// in, so the input goes through imap's lazy path; the results are
  /// collected in order, and the first failed item's error is thrown after
  /// all have run, as map does.
  template <bool Star, class F, class R>
  auto collect_adaptive(std::string_view call, F fn, R&& items, const CallOptions& options) {
    using T = detail::result_of_t<F, detail::item_t<R>, Star>;
    std::vector<T> values;
    if constexpr (std::ranges::sized_range<R>) values.reserve(static_cast<std::size_t>(std::ranges::size(items)));
    auto results = make_imap<Star>(call, true, std::move(fn), std::forward<R>(items), options, false);
    std::exception_ptr first_error;
    for (;;) {
      try {
        auto value = results.next();
        if (!value) break;
        values.push_back(std::move(*value));
      } catch (const PoolNotRunning&) {
        throw;  // nothing after it can run either
      } catch (...) {
        if (!first_error) first_error = std::current_exception();
      }
    }
    if (first_error) std::rethrow_exception(first_error);
    return values;
  }

  /// `consumer_progress`: the progress callback counts the items the
  /// consumer takes (imap, imap_unordered), not the items workers finish (as
  /// map's adaptive path, which takes each at once, does).
  template <bool Star, class F, class R>
  auto make_imap(std::string_view call, bool ordered, F fn, R&& items, const CallOptions& options,
                 bool consumer_progress = true) {
    using Arg = detail::item_t<R>;
    using T = detail::result_of_t<F, Arg, Star>;
    using View = detail::held_t<R>;
    // As map does, even for an empty input: the pool takes no new work.
    live()->require_running();
    std::optional<std::size_t> total;
    if constexpr (std::ranges::sized_range<R>) total = static_cast<std::size_t>(std::ranges::size(items));
    auto source =
        std::make_unique<detail::RangeSource<View, F, Arg, Star>>(detail::hold(std::forward<R>(items)), std::move(fn));
    auto job = std::make_shared<detail::JobState>(call);
    CallOptions job_options = options;
    if (consumer_progress) job_options.progress = nullptr;  // IMap reports instead
    job->configure(job_options, total);
    job->set_streamed();
    job->set_raise_original(raise_original_);
    ImapFeed::Settings settings{.ordered = ordered,
                                .chunksize = std::max<std::size_t>(1, options.chunksize),
                                .prefetch = options.chunksize == adaptive ? adaptive_prefetch_ : prefetch_,
                                .prefetch_bytes = prefetch_bytes_,
                                .total = total};
    return IMapAccess<T>::make(std::make_unique<ImapFeed>(dispatcher_, std::move(source), std::move(job), settings),
                               consumer_progress ? options.progress : ProgressCallback());
  }

 private:
  std::shared_ptr<Engine> dispatcher_;
  bool dormant_ = false;  // made before main() in a worker (open)
  std::size_t processes_ = 0;
  std::size_t prefetch_ = 0;
  std::size_t adaptive_prefetch_ = 0;  // with chunksize procpool::adaptive: chunks of about 2 ms need no deep queue
  std::size_t prefetch_bytes_ = 0;
  bool raise_original_ = false;  // Options::raise_original_exceptions
};

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
#include "dispatcher.hpp"
#include "launch.hpp"

namespace procpool::detail {

PROCPOOL_ENGINE_INLINE Calls Calls::open(Options options) {
  if (in_worker_before_init()) {
    // A global Pool in a worker: no thread, no process. Used, it is a
    // main() that forgot init (live()).
    Calls dormant;
    dormant.processes_ = options.processes;
    dormant.dormant_ = true;
    return dormant;
  }
  if (options.task_timeout.count() < 0) {
    throw std::invalid_argument(fmt::format("procpool: Options::task_timeout is negative ({} ms); use 0 for no limit",
                                            options.task_timeout.count()));
  }
  try {
    std::unique_ptr<Transport> transport = make_transport(options);
    if (options.processes == 0) options.processes = transport->default_processes();
    return Calls(options, std::move(transport));
  } catch (const std::system_error& e) {
    throw_start_error(e);
  }
}

PROCPOOL_ENGINE_INLINE void Calls::throw_start_error(const std::system_error& e) {
  std::string_view call = e.what();
  if (call.starts_with("procpool:")) throw;
  const std::string reason = e.code().message();
  if (call.ends_with(": " + reason)) call.remove_suffix(reason.size() + 2);
  const bool no_fds =
      e.code() == std::errc::too_many_files_open || e.code() == std::errc::too_many_files_open_in_system;
  throw std::system_error(e.code(), fmt::format("procpool: the pool could not start{}: {}",
                                                no_fds ? ", out of file descriptors (see ulimit -n)" : "", call));
}

PROCPOOL_ENGINE_INLINE void Calls::throw_not_live() const {
  if (!dormant_) throw PoolNotRunning("procpool: this Pool was moved from; it accepts no work");
  refuse_uninitialized_worker();  // main() forgot procpool::init: stops here, with the hint
  throw PoolNotRunning(
      "procpool: this Pool was made at namespace scope, before main(), in a process procpool started "
      "(a worker or the fork server), where it never runs: a task cannot use the pool of the program");
}

PROCPOOL_ENGINE_INLINE Calls::Calls(const Options& options, std::unique_ptr<Transport> transport)
    // In a child made by fork(), the last copy of a pointer to it leaves it
    // be: its threads are not there to join, its workers not the child's.
    : processes_(options.processes),
      prefetch_bytes_(options.imap_prefetch_bytes),
      raise_original_(options.raise_original_exceptions) {
  std::shared_ptr<Dispatcher> dispatcher(new Dispatcher(options, std::move(transport)), [](Dispatcher* d) {
    if (!d->forked_copy()) delete d;
  });
  dispatcher_ = dispatcher;
  Dispatcher::defer_start(dispatcher);
  // Four times what the workers hold at once.
  const std::size_t held_x4 = 4 * options.processes * std::max<std::size_t>(1, options.max_tasks_in_flight);
  prefetch_ = options.imap_prefetch != 0 ? options.imap_prefetch : std::max(imap_default_prefetch, held_x4);
  adaptive_prefetch_ = options.imap_prefetch != 0 ? options.imap_prefetch : held_x4;
}

}  // namespace procpool::detail
#endif

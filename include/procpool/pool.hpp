/// @file
/// The pool of worker processes: procpool::Pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <ranges>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "async_result.hpp"
#include "call_options.hpp"
#include "cpu_count.hpp"
#include "detail/dispatcher.hpp"
#include "detail/handlers.hpp"
#include "detail/launch.hpp"
#include "detail/ranges.hpp"
#include "errors.hpp"
#include "imap.hpp"
#include "options.hpp"

namespace procpool {

namespace detail {

template <class R>
using item_t = std::remove_cvref_t<std::ranges::range_value_t<R>>;

/// The value a call with callable F on items of type Arg yields on the parent side.
template <class F, class Arg, bool Star>
using result_of_t = stored_t<typename call_traits<F, Arg, Star>::result>;

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
      {
        const Arg& item = *it;
        encoder(item);
      }
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

}  // namespace detail

/**
 * A pool of worker processes: Python's `multiprocessing.Pool` for C++.
 *
 * A function is named by template argument (`pool.map<square>(xs)`) or
 * passed as a captureless lambda or a serializable function object
 * (`pool.map(Scale{2.5}, xs)`). Arguments and results travel as cereal
 * binary archives; a type that cannot travel is a compile error.
 *
 * Example:
 * @code
 * long square(long x) { return x * x; }
 * int main(int argc, char** argv) {
 *   procpool::init(argc, argv);
 *   procpool::Pool pool({.processes = 4});
 *   std::vector<long> squares = pool.map<square>(std::vector<long>{1, 2, 3});
 * }
 * @endcode
 *
 * Destroying a pool that was not joined terminates it, as leaving Python's
 * `with Pool() as pool:` block does: unfinished tasks fail with
 * PoolNotRunning and the workers are stopped (SIGTERM, then SIGKILL after
 * 200 ms). To wait for queued work instead, call close() then join().
 *
 * All member functions but the move operations are thread-safe: several
 * threads may submit work to one pool at once.
 */
class Pool {
 public:
  /**
   * Starts `options.processes` workers.
   * @param options the pool's settings; every field has a default.
   * @throws Error if the start method is not available; std::system_error if a
   *         system call fails.
   */
  explicit Pool(Options options = {}) {
    if (options.processes == 0) options.processes = cpu_count();
    dispatcher_ = std::make_shared<detail::Dispatcher>(options, detail::make_launcher(options));
    processes_ = options.processes;
    // Four times what the workers hold at once.
    const std::size_t held_x4 = 4 * options.processes * std::max<std::size_t>(1, options.max_tasks_in_flight);
    prefetch_ = options.imap_prefetch != 0 ? options.imap_prefetch : std::max(imap_default_prefetch, held_x4);
    adaptive_prefetch_ = options.imap_prefetch != 0 ? options.imap_prefetch : held_x4;
    prefetch_bytes_ = options.imap_prefetch_bytes;
    raise_original_ = options.raise_original_exceptions;
  }

  /// Takes over `other`'s workers; `other` may then only be destroyed or assigned to.
  Pool(Pool&& other) noexcept = default;
  /// Terminates the pool this one held unless it was joined, as the
  /// destructor does, then takes over `other`'s workers.
  Pool& operator=(Pool&& other) noexcept {
    if (this != &other) {
      if (dispatcher_) dispatcher_->shutdown();
      dispatcher_ = std::move(other.dispatcher_);
      processes_ = other.processes_;
      prefetch_ = other.prefetch_;
      adaptive_prefetch_ = other.adaptive_prefetch_;
      prefetch_bytes_ = other.prefetch_bytes_;
      raise_original_ = other.raise_original_;
    }
    return *this;
  }

  /// Terminates the pool unless it was joined, then runs the callbacks still
  /// queued (the error_callbacks of what it failed); never throws.
  ~Pool() {
    if (dispatcher_) dispatcher_->shutdown();
  }

  /// Number of worker processes.
  std::size_t processes() const noexcept { return processes_; }

  // ---- map --------------------------------------------------------------------

  /**
   * Calls `Fn` on every item, in parallel; returns the results in input order.
   *
   * @code
   * std::vector<long> squares = pool.map<square>(xs);
   * @endcode
   *
   * @tparam Fn the function to call, named at compile time.
   * @param items any input range; its items must be serializable. One
   *        without a size is read whole first.
   * @param chunksize items per task; 0 chooses Python's default, ceil(n / (4 * processes))
   * @return a std::vector of the results, in input order.
   * @throws RemoteError an item's task threw (the first failed item by input index, after all have run)
   * @throws WorkerLost a worker died holding an item (likewise)
   * @throws TaskTimeout an item's task ran longer than its task_timeout (likewise)
   * @throws PoolNotRunning the pool was closed or terminated
   */
  template <auto Fn, std::ranges::input_range R>
  auto map(R&& items, std::size_t chunksize = 0) {
    return map(detail::FnConst<Fn>{}, std::forward<R>(items), CallOptions{.chunksize = chunksize});
  }
  /// map() with per-call settings: `pool.map<f>(xs, {.chunksize = 8, .progress = bar})`.
  template <auto Fn, std::ranges::input_range R>
  auto map(R&& items, const CallOptions& options) {
    return map(detail::FnConst<Fn>{}, std::forward<R>(items), options);
  }
  /// map() with a captureless lambda or serializable function object.
  template <detail::callable_object F, std::ranges::input_range R>
  auto map(F fn, R&& items, std::size_t chunksize = 0) {
    return map(std::move(fn), std::forward<R>(items), CallOptions{.chunksize = chunksize});
  }
  /// map() of a braced list: `pool.map<square>({1, 2, 3})`.
  template <auto Fn, class T>
  auto map(std::initializer_list<T> items, std::size_t chunksize = 0) {
    return map<Fn>(std::vector<T>(items), chunksize);
  }
  /// map() of a braced list, with per-call settings.
  template <auto Fn, class T>
  auto map(std::initializer_list<T> items, const CallOptions& options) {
    return map<Fn>(std::vector<T>(items), options);
  }
  /// map() of a braced list with a function object.
  template <detail::callable_object F, class T>
  auto map(F fn, std::initializer_list<T> items, std::size_t chunksize = 0) {
    return map(std::move(fn), std::vector<T>(items), chunksize);
  }
  /// map() with a function object and per-call settings.
  template <detail::callable_object F, std::ranges::input_range R>
  auto map(F fn, R&& items, const CallOptions& options) {
    if (options.chunksize == adaptive) {
      return collect_adaptive<false>("map", std::move(fn), std::forward<R>(items), options);
    }
    return submit_map<false>("map", std::move(fn), std::forward<R>(items), options, nullptr, nullptr, true)->collect();
  }

  /**
   * map() in the background: returns at once.
   * @param items as map().
   * @param chunksize as map().
   * @param callback called with the results (`const std::vector<T>&`), on the
   *        pool's callback thread, before the result is ready; it may call
   *        back into the pool. An exception it throws is reported on stderr.
   * @param error_callback called instead, with the `const Error&` get() would
   *        throw, if an item failed (with `Options::raise_original_exceptions`,
   *        the RemoteError nested in what get() throws).
   * @return an AsyncResult of the std::vector of results.
   * @throws PoolNotRunning the pool was closed or terminated
   */
  template <auto Fn, std::ranges::input_range R, class Callback = std::nullptr_t, class ErrorCallback = std::nullptr_t>
  auto map_async(R&& items, std::size_t chunksize = 0, Callback callback = nullptr,
                 ErrorCallback error_callback = nullptr) {
    return map_async(detail::FnConst<Fn>{}, std::forward<R>(items), CallOptions{.chunksize = chunksize},
                     std::move(callback), std::move(error_callback));
  }
  /// map_async() with per-call settings.
  template <auto Fn, std::ranges::input_range R, class Callback = std::nullptr_t, class ErrorCallback = std::nullptr_t>
  auto map_async(R&& items, const CallOptions& options, Callback callback = nullptr,
                 ErrorCallback error_callback = nullptr) {
    return map_async(detail::FnConst<Fn>{}, std::forward<R>(items), options, std::move(callback),
                     std::move(error_callback));
  }
  /// map_async() of a braced list: `pool.map_async<square>({1, 2, 3})`.
  template <auto Fn, class T, class Callback = std::nullptr_t, class ErrorCallback = std::nullptr_t>
  auto map_async(std::initializer_list<T> items, std::size_t chunksize = 0, Callback callback = nullptr,
                 ErrorCallback error_callback = nullptr) {
    return map_async<Fn>(std::vector<T>(items), chunksize, std::move(callback), std::move(error_callback));
  }
  /// map_async() with a captureless lambda or serializable function object.
  template <detail::callable_object F, std::ranges::input_range R, class Callback = std::nullptr_t,
            class ErrorCallback = std::nullptr_t>
  auto map_async(F fn, R&& items, std::size_t chunksize = 0, Callback callback = nullptr,
                 ErrorCallback error_callback = nullptr) {
    return map_async(std::move(fn), std::forward<R>(items), CallOptions{.chunksize = chunksize}, std::move(callback),
                     std::move(error_callback));
  }
  /// map_async() with a function object and per-call settings.
  template <detail::callable_object F, std::ranges::input_range R, class Callback = std::nullptr_t,
            class ErrorCallback = std::nullptr_t>
  auto map_async(F fn, R&& items, const CallOptions& options, Callback callback = nullptr,
                 ErrorCallback error_callback = nullptr) {
    using T = detail::result_of_t<F, detail::item_t<R>, false>;
    return detail::AsyncAccess<std::vector<T>>::make(
        submit_map<false>("map_async", std::move(fn), std::forward<R>(items), options, to_callback(std::move(callback)),
                          to_callback(std::move(error_callback))));
  }

  /**
   * map() for functions of several arguments: each item is a tuple (or pair) of them.
   * @param items a range of tuples or pairs, each unpacked into `Fn`'s arguments.
   * @param chunksize as map().
   * @return a std::vector of the results, in input order.
   * @throws Error as map()
   */
  template <auto Fn, std::ranges::input_range R>
  auto starmap(R&& items, std::size_t chunksize = 0) {
    return starmap(detail::FnConst<Fn>{}, std::forward<R>(items), CallOptions{.chunksize = chunksize});
  }
  /// starmap() with per-call settings.
  template <auto Fn, std::ranges::input_range R>
  auto starmap(R&& items, const CallOptions& options) {
    return starmap(detail::FnConst<Fn>{}, std::forward<R>(items), options);
  }
  /// starmap() with a captureless lambda or serializable function object.
  template <detail::callable_object F, std::ranges::input_range R>
  auto starmap(F fn, R&& items, std::size_t chunksize = 0) {
    return starmap(std::move(fn), std::forward<R>(items), CallOptions{.chunksize = chunksize});
  }
  /// starmap() with a function object and per-call settings.
  template <detail::callable_object F, std::ranges::input_range R>
  auto starmap(F fn, R&& items, const CallOptions& options) {
    if (options.chunksize == adaptive) {
      return collect_adaptive<true>("starmap", std::move(fn), std::forward<R>(items), options);
    }
    return submit_map<true>("starmap", std::move(fn), std::forward<R>(items), options, nullptr, nullptr, true)
        ->collect();
  }

  /// starmap() in the background.
  template <auto Fn, std::ranges::input_range R, class Callback = std::nullptr_t, class ErrorCallback = std::nullptr_t>
  auto starmap_async(R&& items, std::size_t chunksize = 0, Callback callback = nullptr,
                     ErrorCallback error_callback = nullptr) {
    return starmap_async(detail::FnConst<Fn>{}, std::forward<R>(items), CallOptions{.chunksize = chunksize},
                         std::move(callback), std::move(error_callback));
  }
  /// starmap_async() with per-call settings.
  template <auto Fn, std::ranges::input_range R, class Callback = std::nullptr_t, class ErrorCallback = std::nullptr_t>
  auto starmap_async(R&& items, const CallOptions& options, Callback callback = nullptr,
                     ErrorCallback error_callback = nullptr) {
    return starmap_async(detail::FnConst<Fn>{}, std::forward<R>(items), options, std::move(callback),
                         std::move(error_callback));
  }
  /// starmap_async() with a captureless lambda or serializable function object.
  template <detail::callable_object F, std::ranges::input_range R, class Callback = std::nullptr_t,
            class ErrorCallback = std::nullptr_t>
  auto starmap_async(F fn, R&& items, std::size_t chunksize = 0, Callback callback = nullptr,
                     ErrorCallback error_callback = nullptr) {
    return starmap_async(std::move(fn), std::forward<R>(items), CallOptions{.chunksize = chunksize},
                         std::move(callback), std::move(error_callback));
  }
  /// starmap_async() with a function object and per-call settings.
  template <detail::callable_object F, std::ranges::input_range R, class Callback = std::nullptr_t,
            class ErrorCallback = std::nullptr_t>
  auto starmap_async(F fn, R&& items, const CallOptions& options, Callback callback = nullptr,
                     ErrorCallback error_callback = nullptr) {
    using T = detail::result_of_t<F, detail::item_t<R>, true>;
    return detail::AsyncAccess<std::vector<T>>::make(
        submit_map<true>("starmap_async", std::move(fn), std::forward<R>(items), options,
                         to_callback(std::move(callback)), to_callback(std::move(error_callback))));
  }

  // ---- imap -------------------------------------------------------------------

  /**
   * Lazy map: results in input order, as they become available. The input
   * is read only as far as `Options::imap_prefetch` chunks (and
   * `Options::imap_prefetch_bytes`) ahead of the consumer, so it may be
   * endless. An rvalue input is moved into the result; an lvalue one must
   * outlive it.
   *
   * @code
   * for (long v : pool.imap<square>(std::views::iota(0L, 1000L))) use(v);
   * @endcode
   *
   * @param items any input range; its items must be serializable.
   * @param chunksize items per task (default 1, as in Python)
   * @return an IMap of the results; errors, PoolNotRunning included, surface
   *         as it is consumed.
   */
  template <auto Fn, std::ranges::input_range R>
  auto imap(R&& items, std::size_t chunksize = 1) {
    return imap(detail::FnConst<Fn>{}, std::forward<R>(items), CallOptions{.chunksize = chunksize});
  }
  /// imap() with per-call settings.
  template <auto Fn, std::ranges::input_range R>
  auto imap(R&& items, const CallOptions& options) {
    return imap(detail::FnConst<Fn>{}, std::forward<R>(items), options);
  }
  /// imap() of a braced list (copied: the results may outlive it).
  template <auto Fn, class T>
  auto imap(std::initializer_list<T> items, std::size_t chunksize = 1) {
    return imap<Fn>(std::vector<T>(items), chunksize);
  }
  /// imap() with a captureless lambda or serializable function object.
  template <detail::callable_object F, std::ranges::input_range R>
  auto imap(F fn, R&& items, std::size_t chunksize = 1) {
    return imap(std::move(fn), std::forward<R>(items), CallOptions{.chunksize = chunksize});
  }
  /// imap() with a function object and per-call settings.
  template <detail::callable_object F, std::ranges::input_range R>
  auto imap(F fn, R&& items, const CallOptions& options) {
    return make_imap<false>("imap", true, std::move(fn), std::forward<R>(items), options);
  }

  /// Like imap(), but yields results in the order they complete.
  template <auto Fn, std::ranges::input_range R>
  auto imap_unordered(R&& items, std::size_t chunksize = 1) {
    return imap_unordered(detail::FnConst<Fn>{}, std::forward<R>(items), CallOptions{.chunksize = chunksize});
  }
  /// imap_unordered() with per-call settings.
  template <auto Fn, std::ranges::input_range R>
  auto imap_unordered(R&& items, const CallOptions& options) {
    return imap_unordered(detail::FnConst<Fn>{}, std::forward<R>(items), options);
  }
  /// imap_unordered() of a braced list (copied: the results may outlive it).
  template <auto Fn, class T>
  auto imap_unordered(std::initializer_list<T> items, std::size_t chunksize = 1) {
    return imap_unordered<Fn>(std::vector<T>(items), chunksize);
  }
  /// imap_unordered() with a captureless lambda or serializable function object.
  template <detail::callable_object F, std::ranges::input_range R>
  auto imap_unordered(F fn, R&& items, std::size_t chunksize = 1) {
    return imap_unordered(std::move(fn), std::forward<R>(items), CallOptions{.chunksize = chunksize});
  }
  /// imap_unordered() with a function object and per-call settings.
  template <detail::callable_object F, std::ranges::input_range R>
  auto imap_unordered(F fn, R&& items, const CallOptions& options) {
    return make_imap<false>("imap_unordered", false, std::move(fn), std::forward<R>(items), options);
  }

  // ---- apply ------------------------------------------------------------------

  /**
   * Calls `Fn(args...)` in a worker and waits for the result.
   * @param args `Fn`'s arguments; each must be serializable.
   * @return what `Fn` returned (a std::monostate if it returns void).
   * @throws RemoteError `Fn` threw
   * @throws WorkerLost the worker died running it
   * @throws TaskTimeout it ran longer than its task_timeout
   * @throws PoolNotRunning the pool was closed or terminated
   */
  template <auto Fn, class... Args>
  requires(!detail::options_first<Args...>) auto apply(Args&&... args) {
    return apply(detail::FnConst<Fn>{}, std::forward<Args>(args)...);
  }
  /// apply() with per-call settings first: `pool.apply<f>({.task_timeout = 5s}, x)`.
  template <auto Fn, class... Args>
  auto apply(const CallOptions& options, Args&&... args) {
    return apply(detail::FnConst<Fn>{}, options, std::forward<Args>(args)...);
  }
  /// apply() with a captureless lambda or serializable function object.
  template <detail::callable_object F, class... Args>
  requires(!detail::options_first<Args...>) auto apply(F fn, Args&&... args) {
    return submit_apply("apply", CallOptions{}, std::move(fn), nullptr, nullptr, std::forward<Args>(args)...)
        ->take_value();
  }
  /// apply() with a function object and per-call settings.
  template <detail::callable_object F, class... Args>
  auto apply(F fn, const CallOptions& options, Args&&... args) {
    return submit_apply("apply", options, std::move(fn), nullptr, nullptr, std::forward<Args>(args)...)->take_value();
  }

  /**
   * Calls `Fn(args...)` in a worker; returns at once.
   *
   * @code
   * procpool::AsyncResult<long> r = pool.apply_async<square>(7);
   * @endcode
   *
   * @param args `Fn`'s arguments; each must be serializable. The last may be
   *        `procpool::callbacks(on_value, on_error)`: run as map_async's
   *        callback and error_callback are.
   * @return an AsyncResult of what `Fn` returns (`AsyncResult<void>` for void).
   * @throws PoolNotRunning the pool was closed or terminated
   */
  template <auto Fn, class... Args>
  requires(!detail::options_first<Args...>) auto apply_async(Args&&... args) {
    return apply_async(detail::FnConst<Fn>{}, std::forward<Args>(args)...);
  }
  /// apply_async() with per-call settings first.
  template <auto Fn, class... Args>
  auto apply_async(const CallOptions& options, Args&&... args) {
    return apply_async(detail::FnConst<Fn>{}, options, std::forward<Args>(args)...);
  }
  /// apply_async() with a captureless lambda or serializable function object.
  template <detail::callable_object F, class... Args>
  requires(!detail::options_first<Args...>) auto apply_async(F fn, Args&&... args) {
    return make_apply_async("apply_async", CallOptions{}, std::move(fn), std::forward<Args>(args)...);
  }
  /// apply_async() with a function object and per-call settings.
  template <detail::callable_object F, class... Args>
  auto apply_async(F fn, const CallOptions& options, Args&&... args) {
    return make_apply_async("apply_async", options, std::move(fn), std::forward<Args>(args)...);
  }

  // ---- lifecycle --------------------------------------------------------------

  /// Accepts no more work (later calls throw PoolNotRunning); queued and
  /// running tasks still complete, and so does a map that another thread
  /// had started (it may still be sending its input). Calling it again does
  /// nothing.
  void close() { dispatcher_->close(); }

  /// After close() or terminate(): waits for the queued work and for every
  /// worker to exit, and for their relayed output to be delivered.
  /// @throws PoolNotRunning if the pool is still open.
  void join() { dispatcher_->join(); }

  /// Stops the workers at once (SIGTERM, SIGKILL after 200 ms); every
  /// unfinished task fails with PoolNotRunning. Never throws, never hangs.
  void terminate() noexcept { dispatcher_->terminate(); }

 private:
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
  static void submit_batch(detail::Dispatcher& dispatcher, std::size_t prefetch_bytes, detail::MapState<T>& state,
                           std::vector<detail::Chunk>& batch, bool synchronous) {
    if (synchronous && prefetch_bytes != 0) {
      std::vector<std::size_t> sizes;
      std::size_t total = 0;
      for (const auto& chunk : batch) {
        sizes.push_back(chunk.frame.size());
        total += chunk.frame.size();
      }
      state.collect_ready();
      // Beyond the bound, still one chunk a worker more than the workers may
      // hold: tasks queued behind a long one never stop the others' work.
      state.wait_expected(prefetch_bytes - std::min(total, prefetch_bytes),
                          dispatcher.processes() * (dispatcher.max_tasks_per_worker() + 1));
      state.expect(batch.front().index, sizes);
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
      const std::shared_ptr<detail::Dispatcher> dispatcher = dispatcher_;
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
        typename detail::AsyncState<std::vector<T>>::Callback on_value;
        typename detail::AsyncState<std::vector<T>>::ErrorCallback on_error;
        if constexpr (!std::is_null_pointer_v<Callback>) on_value = std::move(callback);
        if constexpr (!std::is_null_pointer_v<ErrorCallback>) on_error = std::move(error_callback);
        state->set_callbacks(std::move(on_value), std::move(on_error));
      }
      // Chunks go to the workers in batches as they are encoded, so the
      // first run while the rest are still being encoded. The stream keeps
      // a close() from another thread from refusing the later batches.
      // A synchronous map's batches also stay under its byte bound.
      const std::size_t batch_bytes =
          synchronous && prefetch_bytes != 0 ? std::min(std::size_t{1} << 20, prefetch_bytes) : std::size_t{1} << 20;
      dispatcher->open_stream();
      struct StreamEnd {
        detail::Dispatcher& dispatcher;
        ~StreamEnd() { dispatcher.close_stream(); }
      } stream_end{*dispatcher};
      std::vector<detail::Chunk> batch;
      std::size_t bytes = 0;
      try {
        auto it = std::ranges::begin(items);
        auto end = std::ranges::end(items);
        for (std::uint64_t index = 0; it != end; ++index) {
          detail::Chunk chunk{state, index, dispatcher->new_frame(), {}};
          std::size_t start = detail::begin_task_frame(chunk.frame, handler);
          auto n = detail::encode_items<F, Arg>(chunk.frame, chunk.shares, fn, it, end, chunksize);
          detail::finish_task_frame(chunk.frame, start, n);
          bytes += chunk.frame.size();
          batch.push_back(std::move(chunk));
          if (bytes >= batch_bytes) {
            submit_batch(*dispatcher, prefetch_bytes, *state, batch, synchronous);
            bytes = 0;
          }
        }
        if (!batch.empty()) submit_batch(*dispatcher, prefetch_bytes, *state, batch, synchronous);
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
    const std::shared_ptr<detail::Dispatcher> dispatcher = dispatcher_;  // as in submit_map
    auto state = std::make_shared<detail::ApplyState<T>>(call);
    state->configure(options, 1);
    state->set_raise_original(raise_original_);
    if constexpr (!std::is_null_pointer_v<OnValue> || !std::is_null_pointer_v<OnError>) {
      typename detail::AsyncState<T>::Callback value_callback;
      typename detail::AsyncState<T>::ErrorCallback error_callback;
      if constexpr (!std::is_null_pointer_v<OnValue>) value_callback = std::move(on_value);
      if constexpr (!std::is_null_pointer_v<OnError>) error_callback = std::move(on_error);
      state->set_callbacks(std::move(value_callback), std::move(error_callback));
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
    dispatcher_->require_running();
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
    return detail::IMapAccess<T>::make(dispatcher_, std::move(source), std::move(job), ordered,
                                       std::max<std::size_t>(1, options.chunksize),
                                       options.chunksize == adaptive ? adaptive_prefetch_ : prefetch_, prefetch_bytes_,
                                       total, consumer_progress ? options.progress : ProgressCallback());
  }

  std::shared_ptr<detail::Dispatcher> dispatcher_;
  std::size_t processes_ = 0;
  std::size_t prefetch_ = 0;
  std::size_t adaptive_prefetch_ = 0;  // with chunksize procpool::adaptive: chunks of about 2 ms need no deep queue
  std::size_t prefetch_bytes_ = 0;
  bool raise_original_ = false;  // Options::raise_original_exceptions
};

}  // namespace procpool

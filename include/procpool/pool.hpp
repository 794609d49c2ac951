/// @file
/// The pool of worker processes: procpool::Pool.
#pragma once

#include <cstddef>
#include <exception>
#include <initializer_list>
#include <ranges>
#include <utility>
#include <vector>

#include "async_result.hpp"
#include "call_options.hpp"
#include "cpu_count.hpp"
#include "detail/calls.hpp"
#include "errors.hpp"
#include "imap.hpp"
#include "options.hpp"

namespace procpool {

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
 * PoolNotRunning and the workers are stopped: idle ones exit the normal way,
 * busy ones get SIGTERM, then SIGKILL after 200 ms. To wait for queued work
 * instead, call close() then join().
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
  explicit Pool(Options options = {}) : calls_(detail::Calls::open(std::move(options))) {}

  /// Takes over `other`'s workers; `other` may then only be destroyed or assigned to.
  Pool(Pool&& other) noexcept = default;
  /// Terminates the pool this one held unless it was joined, as the
  /// destructor does, then takes over `other`'s workers.
  Pool& operator=(Pool&& other) noexcept {
    if (this != &other) {
      if (calls_.dispatcher() != nullptr) calls_.dispatcher()->shutdown();
      calls_ = std::move(other.calls_);
    }
    return *this;
  }

  /// Terminates the pool unless it was joined, then runs the callbacks still
  /// queued (the error_callbacks of what it failed); never throws.
  ~Pool() {
    if (calls_.dispatcher() != nullptr) calls_.dispatcher()->shutdown();
  }

  /// Number of worker processes.
  std::size_t processes() const noexcept { return calls_.processes(); }

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
      return calls_.collect_adaptive<false>("map", std::move(fn), std::forward<R>(items), options);
    }
    return calls_.submit_map<false>("map", std::move(fn), std::forward<R>(items), options, nullptr, nullptr, true)
        ->collect();
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
        calls_.submit_map<false>("map_async", std::move(fn), std::forward<R>(items), options,
                                 detail::Calls::to_callback(std::move(callback)),
                                 detail::Calls::to_callback(std::move(error_callback))));
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
      return calls_.collect_adaptive<true>("starmap", std::move(fn), std::forward<R>(items), options);
    }
    return calls_.submit_map<true>("starmap", std::move(fn), std::forward<R>(items), options, nullptr, nullptr, true)
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
        calls_.submit_map<true>("starmap_async", std::move(fn), std::forward<R>(items), options,
                                detail::Calls::to_callback(std::move(callback)),
                                detail::Calls::to_callback(std::move(error_callback))));
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
    return calls_.make_imap<false>("imap", true, std::move(fn), std::forward<R>(items), options);
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
    return calls_.make_imap<false>("imap_unordered", false, std::move(fn), std::forward<R>(items), options);
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
    return calls_.submit_apply("apply", CallOptions{}, std::move(fn), nullptr, nullptr, std::forward<Args>(args)...)
        ->take_value();
  }
  /// apply() with a function object and per-call settings.
  template <detail::callable_object F, class... Args>
  auto apply(F fn, const CallOptions& options, Args&&... args) {
    return calls_.submit_apply("apply", options, std::move(fn), nullptr, nullptr, std::forward<Args>(args)...)
        ->take_value();
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
    return calls_.make_apply_async("apply_async", CallOptions{}, std::move(fn), std::forward<Args>(args)...);
  }
  /// apply_async() with a function object and per-call settings.
  template <detail::callable_object F, class... Args>
  auto apply_async(F fn, const CallOptions& options, Args&&... args) {
    return calls_.make_apply_async("apply_async", options, std::move(fn), std::forward<Args>(args)...);
  }

  // ---- lifecycle --------------------------------------------------------------

  /// Accepts no more work (later calls throw PoolNotRunning); queued and
  /// running tasks still complete, and so does a map that another thread
  /// had started (it may still be sending its input). Calling it again does
  /// nothing.
  void close() { calls_.live()->close(); }

  // ---- mistakes that get a message instead of pages of errors ------------------
  /// @cond PROCPOOL_MISTAKES (not part of the API: each one is a compile error)
  // Python's pool.map(f, xs) passes f by value; a C++ function pointer is an
  // address, which no worker can use. These say so at compile time, and
  // return what the real call would, so the caller's code adds no errors.

  template <class Ret, class... P, class... Rest>
  std::vector<detail::stored_t<Ret>> map(Ret (*)(P...), Rest&&...) {
    static_assert(detail::refuse_function_pointer<Ret>::value);
    std::terminate();  // unreachable: the build failed; the type spares the caller's code more errors
  }
  template <class Ret, class... P, class... Rest>
  AsyncResult<std::vector<detail::stored_t<Ret>>> map_async(Ret (*)(P...), Rest&&...) {
    static_assert(detail::refuse_function_pointer<Ret>::value);
    std::terminate();  // unreachable: the build failed; the type spares the caller's code more errors
  }
  template <class Ret, class... P, class... Rest>
  std::vector<detail::stored_t<Ret>> starmap(Ret (*)(P...), Rest&&...) {
    static_assert(detail::refuse_function_pointer<Ret>::value);
    std::terminate();  // unreachable: the build failed; the type spares the caller's code more errors
  }
  template <class Ret, class... P, class... Rest>
  AsyncResult<std::vector<detail::stored_t<Ret>>> starmap_async(Ret (*)(P...), Rest&&...) {
    static_assert(detail::refuse_function_pointer<Ret>::value);
    std::terminate();  // unreachable: the build failed; the type spares the caller's code more errors
  }
  // Python's map_async(f, xs, callback=cb): here the chunksize (or the
  // CallOptions) comes before the callbacks.
  template <auto Fn, class R, bool Star>
  using map_async_t = AsyncResult<std::vector<detail::result_of_t<detail::FnConst<Fn>, detail::item_t<R>, Star>>>;
  template <auto Fn, std::ranges::input_range R, detail::misplaced_callback Callback>
  map_async_t<Fn, R, false> map_async(R&&, Callback) {
    static_assert(detail::refuse_callback_position<Callback>::value);
    std::terminate();  // unreachable: the build failed; the type spares the caller's code more errors
  }
  template <auto Fn, std::ranges::input_range R, detail::misplaced_callback Callback>
  map_async_t<Fn, R, true> starmap_async(R&&, Callback) {
    static_assert(detail::refuse_callback_position<Callback>::value);
    std::terminate();  // unreachable: the build failed; the type spares the caller's code more errors
  }
  template <class Ret, class... P, class... Rest>
  std::vector<detail::stored_t<Ret>> imap(Ret (*)(P...), Rest&&...) {
    static_assert(detail::refuse_function_pointer<Ret>::value);
    std::terminate();  // unreachable: the build failed; the type spares the caller's code more errors
  }
  template <class Ret, class... P, class... Rest>
  std::vector<detail::stored_t<Ret>> imap_unordered(Ret (*)(P...), Rest&&...) {
    static_assert(detail::refuse_function_pointer<Ret>::value);
    std::terminate();  // unreachable: the build failed; the type spares the caller's code more errors
  }
  template <class Ret, class... P, class... Rest>
  Ret apply(Ret (*)(P...), Rest&&...) {
    static_assert(detail::refuse_function_pointer<Ret>::value);
    std::terminate();  // unreachable: the build failed; the type spares the caller's code more errors
  }
  template <class Ret, class... P, class... Rest>
  AsyncResult<Ret> apply_async(Ret (*)(P...), Rest&&...) {
    static_assert(detail::refuse_function_pointer<Ret>::value);
    std::terminate();  // unreachable: the build failed; the type spares the caller's code more errors
  }
  /// @endcond

  /// After close() or terminate(): waits for the queued work and for every
  /// worker to exit, and for their relayed output to be delivered.
  /// @throws PoolNotRunning if the pool is still open.
  void join() { calls_.live()->join(); }

  /// Stops the workers at once (idle ones exit; busy ones get SIGTERM, then
  /// SIGKILL after 200 ms); every
  /// unfinished task fails with PoolNotRunning. Never throws, never hangs.
  /// In a child the program made with fork(), it does nothing: the workers
  /// are the parent's (as the destructor there; every other call throws
  /// PoolNotRunning).
  void terminate() noexcept {
    if (calls_.dispatcher() != nullptr) calls_.dispatcher()->terminate();
  }

 private:
  detail::Calls calls_;
};

}  // namespace procpool

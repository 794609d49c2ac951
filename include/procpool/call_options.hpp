/// @file
/// Settings of one call (map, imap, apply_async, ...): procpool::CallOptions.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <optional>
#include <utility>

namespace procpool {

/**
 * Reports how far a call has got: `done` items of `total` (`total` is empty
 * when the input's length is not known, as for an imap over a generator).
 * For map, starmap and the async calls: called on the pool's callback thread
 * each time a chunk of results arrives (so a slow one delays the pool's other
 * callbacks, not its tasks); it may call back into the pool, may run while
 * `map` is still reading its input, and is never called once the call has
 * returned or thrown. For imap and imap_unordered: called on the thread that
 * reads the IMap, as each item is taken from it, so `done == total` once the
 * loop has the last item. `procpool::ProgressBar` is one.
 *
 * @code
 * pool.map<square>(xs, {.progress = [](std::size_t done, std::optional<std::size_t> total) {
 *   std::fprintf(stderr, "%zu of %zu\n", done, total.value_or(0));
 * }});
 * @endcode
 */
using ProgressCallback = std::function<void(std::size_t done, std::optional<std::size_t> total)>;

/**
 * A chunksize that sizes chunks from measured task durations: tiny tasks are
 * batched so per-task overhead vanishes, long ones go one at a time so none
 * straggles. Each chunk aims at about 2 ms of work (`adaptive_chunk_time`),
 * never more than a share of what is left of a sized input. For `map`,
 * `starmap`, `imap` and `imap_unordered`; `map_async` and `starmap_async`
 * use the default chunking instead.
 *
 * @code
 * auto out = pool.map<f>(xs, {.chunksize = procpool::adaptive});
 * @endcode
 */
inline constexpr std::size_t adaptive = static_cast<std::size_t>(-1);

/// The work adaptive chunking puts in one chunk.
inline constexpr std::chrono::microseconds adaptive_chunk_time{2000};

/**
 * Settings of one call, used with designated initializers as the last
 * argument of `map`, `imap`, `imap_unordered`, `starmap` and their `_async`
 * forms; every field has a default:
 *
 * @code
 * auto squares = pool.map<square>(xs, {.chunksize = 64, .progress = procpool::ProgressBar("squares")});
 * @endcode
 *
 * New fields are only ever added at the end.
 *
 * A plain value without locks. A call copies what it needs when it is made,
 * so one CallOptions may serve several calls, from several threads, as long
 * as no thread modifies it meanwhile.
 */
struct CallOptions {
  /// Items per task; 0 chooses the default (map: Python's ceil(n / (4 *
  /// processes)); imap and imap_unordered: 1); `procpool::adaptive` sizes
  /// chunks from measured task durations.
  std::size_t chunksize = 0;
  /// Told of progress as results arrive; see `ProgressCallback`.
  ProgressCallback progress{};
  /// Overrides `Options::retries` for this call's tasks.
  std::optional<std::size_t> retries{};
  /// Overrides `Options::task_timeout` for this call's tasks (0: no limit).
  std::optional<std::chrono::milliseconds> task_timeout{};
};

/**
 * A `callback` and an `error_callback` for `apply_async`, passed after its
 * arguments: `pool.apply_async<f>(x, procpool::callbacks(on_value, on_error))`.
 * They run as map_async's do: on the pool's callback thread, before the
 * result is ready.
 */
template <class OnValue = std::nullptr_t, class OnError = std::nullptr_t>
struct Callbacks {
  OnValue on_value;  ///< called with the result (`const T&`), or nullptr
  OnError on_error;  ///< called with the `const Error&` get() would throw, or nullptr
};

/**
 * Makes the Callbacks of an apply_async call.
 * @param on_value called with the result (`const T&`); nullptr for none.
 * @param on_error called instead, with the `const Error&` get() would throw.
 * @return the callbacks, to pass as apply_async's last argument.
 */
template <class OnValue, class OnError = std::nullptr_t>
Callbacks<OnValue, OnError> callbacks(OnValue on_value, OnError on_error = nullptr) {
  return {std::move(on_value), std::move(on_error)};
}

}  // namespace procpool

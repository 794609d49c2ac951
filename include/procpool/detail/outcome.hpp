// procpool - a chunk's outcome: what the I/O thread delivers for each chunk
// (results, or why there are none), how a job keeps those not yet taken, and
// how the caller turns them into values and exceptions.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "../errors.hpp"
#include "config.hpp"
#include "handlers.hpp"
#include "protocol.hpp"
#include "ring.hpp"
#include "serialize.hpp"
#include "shm.hpp"
#include "system.hpp"

namespace procpool::detail {

using Clock = std::chrono::steady_clock;
using Deadline = std::optional<Clock::time_point>;

/// A user's timeout as a Clock duration, at most 100 years: a longer one
/// (`milliseconds::max()` for "no limit") would overflow the clock and come
/// out as a deadline in the past. Negative ones stay negative, as long.
template <class Rep, class Period>
Clock::duration clamp_timeout(std::chrono::duration<Rep, Period> timeout) {
  constexpr std::chrono::hours longest{24 * 365 * 100};
  const std::chrono::duration<double> seconds = timeout;
  if (seconds >= std::chrono::duration<double>(longest)) return longest;
  if (seconds <= -std::chrono::duration<double>(longest)) return -longest;
  return std::chrono::ceil<Clock::duration>(timeout);
}

/// Why a whole chunk produced no results.
struct ChunkFailure {
  enum class Kind { worker_lost, terminated, initializer, protocol, start_failed, timeout, ended };
  Kind kind = Kind::worker_lost;
  pid_t pid = 0;
  std::size_t worker = 0;
  int wait_status = 0;
  std::string detail;                          // initializer: "type: message"; protocol/start_failed/ended: the reason
  std::shared_ptr<const std::string> where{};  // the worker's host, for a worker on another one (Link::where)
  /// worker_lost, timeout: the position in its chunk of the item that was
  /// running, where the worker said (its claim area).
  std::optional<std::uint32_t> running_item{};
};

/// One chunk's outcome, on its way from the I/O thread to the caller. What
/// every result has is inline; what few have is in `rare`, so the common
/// one is cheap to move.
struct ChunkOutcome {
  std::vector<char> payload;       // holds the per-item outcomes, as the worker encoded them,
  std::size_t payload_offset = 0;  // from this offset (a large frame's buffer is taken over whole)
  /// Or, when they are this small, they are here: no allocation for the
  /// results of short tasks (then payload is empty too).
  static constexpr std::size_t small_capacity = 48;
  std::array<char, small_capacity> small{};
  std::uint8_t small_size = 0;
  std::uint64_t run_ns = 0;  // how long the worker ran the chunk
  pid_t pid = 0;
  std::size_t worker = 0;
  std::shared_ptr<const std::string> where;  // set for a worker on another host (Link::where)

  struct Rare {
    std::unique_ptr<ShmSlice> shm;  // the outcomes are in the worker's shared memory (then payload is empty)
    SharedStates shares;            // the SharedMemory blocks the result refers to, until decoded
    std::string share_failure;      // why a block the worker shared could not be mapped
    std::optional<ChunkFailure> failure;
  };
  std::unique_ptr<Rare> rare;

  Rare& rare_part() {
    if (!rare) rare = std::make_unique<Rare>();
    return *rare;
  }
  /// Why the whole chunk failed, if it did.
  const ChunkFailure* failure() const { return rare && rare->failure ? &*rare->failure : nullptr; }
  const ShmSlice* shm() const { return rare ? rare->shm.get() : nullptr; }

  /// The encoded per-item outcomes.
  std::span<const char> bytes() const {
    if (const ShmSlice* slice = shm()) return {slice->data(), slice->size()};
    if (small_size != 0) return {small.data(), small_size};
    return {payload.data() + payload_offset, payload.size() - payload_offset};
  }
  /// Memory the outcome holds until decoded.
  std::size_t held_bytes() const {
    if (const ShmSlice* slice = shm()) return slice->size();
    return small_size != 0 ? small_size : payload.size();
  }

  /// Keeps a copy of the encoded outcomes [data, data + size).
  void copy_bytes(const char* data, std::size_t size) {
    if (size != 0 && size <= small_capacity) {
      std::memcpy(small.data(), data, size);
      small_size = static_cast<std::uint8_t>(size);
    } else {
      payload.assign(data, data + size);
    }
  }
};

/// The outcomes a job has been delivered and the caller has not taken, in
/// chunk order: in slots reused from one chunk to the next, so a stream of
/// them allocates nothing. Outcomes mostly arrive, and are taken, in order:
/// both ends are cheap then.
class ReadyOutcomes {
 public:
  using Entry = std::pair<std::uint64_t, ChunkOutcome>;

  std::size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  Entry& operator[](std::size_t k) { return entries_[k]; }

  void insert(std::uint64_t chunk, ChunkOutcome&& outcome) {
    entries_.push_back({chunk, std::move(outcome)});
    for (std::size_t k = entries_.size() - 1; k > 0 && entries_[k - 1].first > chunk; --k) {
      std::swap(entries_[k - 1], entries_[k]);
    }
  }
  /// The position of chunk `chunk`, or size() if it is not here.
  std::size_t find(std::uint64_t chunk) const {
    std::size_t lo = 0, hi = entries_.size();
    while (lo < hi) {
      std::size_t mid = lo + (hi - lo) / 2;
      if (entries_[mid].first < chunk) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo < entries_.size() && entries_[lo].first == chunk ? lo : entries_.size();
  }
  bool contains(std::uint64_t chunk) const { return find(chunk) != entries_.size(); }
  void erase(std::size_t k) {
    if (k == 0) {
      entries_.pop_front();
    } else {
      entries_.erase(k);
    }
  }
  void clear() { entries_.clear(); }

 private:
  Ring<Entry> entries_;
};

// ---- turning outcomes into values and exceptions ----------------------------

/// "worker 3 (pid 1234)", or "worker 3 (pid 1234, rank 2 on node7)" for a
/// worker on another host.
PROCPOOL_ENGINE_INLINE std::string worker_label(std::size_t worker, pid_t pid,
                                                const std::shared_ptr<const std::string>& where);

/// The same in parentheses: "(worker 3, pid 1234)", "(worker 3, pid 1234, rank 2 on node7)".
PROCPOOL_ENGINE_INLINE std::string worker_note(std::size_t worker, pid_t pid,
                                               const std::shared_ptr<const std::string>& where);

PROCPOOL_ENGINE_INLINE std::string describe_input(std::string_view call, std::size_t index);

/// The error of item `index` of a chunk of `count` items from `first` that
/// failed whole. Where the item that was running is known, a crash names
/// it and says what became of this one; a timeout (which bounds the whole
/// chunk) names the chunk and the item that was running.
PROCPOOL_ENGINE_INLINE std::exception_ptr make_chunk_error(const ChunkFailure& failure, std::string_view call,
                                                           std::size_t index, std::size_t first, std::size_t count);

/// An item's exception, as a worker reported it (`type`, `message`): a
/// RemoteError, or with `raise_original` the original type where it is known.
PROCPOOL_ENGINE_INLINE std::exception_ptr raised_error(const ChunkOutcome& outcome, std::string_view call,
                                                       bool raise_original, std::size_t index, std::string type,
                                                       std::string message);

/// Why a chunk whose outcomes could not be decoded failed, called where the
/// exception that stopped the decoding is handled (of any type: a result
/// type's load() may throw anything).
PROCPOOL_ENGINE_INLINE ChunkFailure undecodable(const ChunkOutcome& outcome);

[[noreturn]] PROCPOOL_ENGINE_INLINE void throw_bad_item_outcome(std::uint8_t byte);

/// Decodes one chunk's outcome, calling on_value(index, R&&) or
/// on_error(index, exception_ptr) for each of its `count` items, in order.
template <class R, class OnValue, class OnError>
void decode_chunk(const ChunkOutcome& outcome, std::string_view call, bool raise_original, std::size_t first_index,
                  std::size_t count, OnValue&& on_value, OnError&& on_error) {
  if (const ChunkFailure* failure = outcome.failure()) {
    for (std::size_t i = 0; i < count; ++i) {
      on_error(first_index + i, make_chunk_error(*failure, call, first_index + i, first_index, count));
    }
    return;
  }
  const std::span<const char> bytes = outcome.bytes();
  Decoder decoder(bytes.data(), bytes.size());
  std::size_t i = 0;
  try {
    for (; i < count; ++i) {
      std::uint8_t byte = 0;
      decoder(byte);
      if (byte == outcome_byte(ItemOutcome::value)) {
        R value{};
        decoder(value);
        on_value(first_index + i, std::move(value));
      } else if (byte == outcome_byte(ItemOutcome::unsent)) {
        std::string why;
        decoder(why);
        on_error(first_index + i, make_chunk_error({ChunkFailure::Kind::protocol, outcome.pid, outcome.worker, 0,
                                                    std::move(why), outcome.where},
                                                   call, first_index + i, first_index, count));
      } else if (byte != outcome_byte(ItemOutcome::raised)) {
        throw_bad_item_outcome(byte);
      } else {
        std::string type, message;
        decoder(type, message);
        on_error(first_index + i,
                 raised_error(outcome, call, raise_original, first_index + i, std::move(type), std::move(message)));
      }
    }
  } catch (...) {
    const ChunkFailure bad = undecodable(outcome);
    for (; i < count; ++i) on_error(first_index + i, make_chunk_error(bad, call, first_index + i, first_index, count));
  }
}

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE std::string worker_label(std::size_t worker, pid_t pid,
                                                const std::shared_ptr<const std::string>& where) {
  if (where == nullptr) return fmt::format("worker {} (pid {})", worker, pid);
  return fmt::format("worker {} (pid {}, {})", worker, pid, *where);
}

PROCPOOL_ENGINE_INLINE std::exception_ptr raised_error(const ChunkOutcome& outcome, std::string_view call,
                                                       bool raise_original, std::size_t index, std::string type,
                                                       std::string message) {
  std::string what =
      fmt::format("procpool: {} raised {}{}{} {}", describe_input(call, index), type, message.empty() ? "" : ": ",
                  message, worker_note(outcome.worker, outcome.pid, outcome.where));
  RemoteError error(std::move(what), std::move(type), std::move(message), outcome.pid, outcome.worker, index);
  return raise_original ? error.original() : std::make_exception_ptr(std::move(error));
}

PROCPOOL_ENGINE_INLINE ChunkFailure undecodable(const ChunkOutcome& outcome) {
  std::string why = current_exception_message();
  if (why.empty()) why = current_exception_summary();  // not a std::exception, or no message: its type
  return ChunkFailure{ChunkFailure::Kind::protocol,
                      outcome.pid,
                      outcome.worker,
                      0,
                      !outcome.rare || outcome.rare->share_failure.empty()
                          ? fmt::format("its result could not be decoded ({})", why)
                          : fmt::format("a procpool::SharedMemory block in its result could not be mapped in this "
                                        "process ({})",
                                        outcome.rare->share_failure),
                      outcome.where};
}

PROCPOOL_ENGINE_INLINE void throw_bad_item_outcome(std::uint8_t byte) {
  throw std::runtime_error(fmt::format("an item outcome of {}, which is none of 0, 1 and 2", byte));
}

PROCPOOL_ENGINE_INLINE std::string worker_note(std::size_t worker, pid_t pid,
                                               const std::shared_ptr<const std::string>& where) {
  if (where == nullptr) return fmt::format("(worker {}, pid {})", worker, pid);
  return fmt::format("(worker {}, pid {}, {})", worker, pid, *where);
}

PROCPOOL_ENGINE_INLINE std::string describe_input(std::string_view call, std::size_t index) {
  if (call == "apply" || call == "apply_async") return fmt::format("the {} task", call);
  return fmt::format("{} input #{}", call, index);
}

PROCPOOL_ENGINE_INLINE std::exception_ptr make_chunk_error(const ChunkFailure& failure, std::string_view call,
                                                           std::size_t index, std::size_t first, std::size_t count) {
  std::string input = describe_input(call, index);
  // The item that was running, where known (else this one).
  const bool known = failure.running_item.has_value() && count > 1;
  const std::size_t culprit = known ? first + *failure.running_item : index;
  // "procpool: map input #3 did not run: " for an item of the chunk other than the one running.
  std::string fate = "procpool: ";
  if (culprit != index) {
    fate = fmt::format("procpool: {} {}: ", input,
                       index < culprit ? "ran, but its result was lost with its chunk" : "did not run");
  }
  switch (failure.kind) {
    case ChunkFailure::Kind::worker_lost: {
      int status = failure.wait_status;
      int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
      int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      const std::string running = culprit != index ? describe_input(call, culprit) + ", in the same chunk" : input;
      return std::make_exception_ptr(
          WorkerLost(fmt::format("{}{} {} while running {}{}{}{}", fate,
                                 worker_label(failure.worker, failure.pid, failure.where), describe_wait_status(status),
                                 running, status == wait_status_let_go ? "" : "; the pool replaced it",
                                 failure.detail.empty() ? "" : ". ", failure.detail),
                     failure.pid, failure.worker, index, sig, code));
    }
    case ChunkFailure::Kind::timeout: {
      const std::string worker = worker_label(failure.worker, failure.pid, failure.where);
      if (!known) {
        return std::make_exception_ptr(TaskTimeout(
            fmt::format("procpool: {} ran longer than the task timeout ({}) in {}; the worker was stopped and replaced",
                        input, failure.detail, worker)));
      }
      // The limit is on the chunk: "its chunk (map inputs #0 to #9) ran
      // longer than ... while map input #5 was running".
      const std::string chunk = fmt::format("{} inputs #{} to #{}", call, first, first + count - 1);
      const std::string lead = culprit == index ? fmt::format("procpool: {} was running when its chunk", input)
                               : index < culprit
                                   ? fmt::format("procpool: {} ran, but its result was lost: its chunk", input)
                                   : fmt::format("procpool: {} did not run: its chunk", input);
      return std::make_exception_ptr(TaskTimeout(
          fmt::format("{} ({}) ran longer than the task timeout ({}) in {}{}; the worker was stopped and replaced",
                      lead, chunk, failure.detail, worker,
                      culprit == index ? std::string() : ", while " + describe_input(call, culprit) + " was running")));
    }
    case ChunkFailure::Kind::terminated:
      return std::make_exception_ptr(
          PoolNotRunning(fmt::format("procpool: the pool was terminated before {} finished", input)));
    case ChunkFailure::Kind::initializer:
      return std::make_exception_ptr(InitializerError(
          fmt::format("procpool: {} was not run: the pool's initializer failed in {}: {}. "
                      "The pool does not restart workers to retry a failing initializer; fix it and create a new pool",
                      input, worker_label(failure.worker, failure.pid, failure.where), failure.detail)));
    case ChunkFailure::Kind::protocol:
      return std::make_exception_ptr(
          ProtocolError(fmt::format("procpool: {} failed: {}{}", input, failure.detail,
                                    // pid 0: refused before it reached a worker
                                    failure.pid == 0 ? std::string()
                                                     : " " + worker_note(failure.worker, failure.pid, failure.where))));
    case ChunkFailure::Kind::start_failed:
      return std::make_exception_ptr(Error(fmt::format("procpool: {} was not run: {}", input, failure.detail)));
    case ChunkFailure::Kind::ended:
      return std::make_exception_ptr(
          PoolNotRunning(fmt::format("procpool: {} was not run: {}", input, failure.detail)));
  }
  return {};
}

}  // namespace procpool::detail
#endif

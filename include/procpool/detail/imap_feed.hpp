// procpool - the engine behind an IMap: reads the input only as far as the
// prefetch allows, submits its chunks, sizes adaptive chunks, and takes the
// outcomes back in order (imap) or as they come (imap_unordered). It knows
// nothing of the result type: IMap<T> decodes what it hands over.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "../call_options.hpp"
#include "../errors.hpp"
#include "config.hpp"
#include "engine.hpp"
#include "job.hpp"
#include "outcome.hpp"

namespace procpool::detail {

/// Pulls the next items of an imap input into a task frame. Type-erased so
/// IMap<T> does not carry the input's type.
class ChunkSource {
 public:
  virtual ~ChunkSource() = default;
  /// Appends up to `max_items` items (with the callable) to a task frame
  /// body, listing the SharedMemory blocks they refer to in `shares`;
  /// returns how many. 0 means the input is exhausted.
  virtual std::uint32_t fill(TaskBytes& frame, SharedStates& shares, std::size_t max_items) = 0;
  virtual std::uint64_t handler_id() const = 0;
};

class ImapFeed {
 public:
  struct Settings {
    bool ordered = true;
    std::size_t chunksize = 1;  // or procpool::adaptive
    std::size_t prefetch = 1;   // chunks in flight, at most
    std::size_t prefetch_bytes = 0;
    std::optional<std::size_t> total;  // the input's length, if known
  };

  ImapFeed(std::shared_ptr<Engine> dispatcher, std::unique_ptr<ChunkSource> source, std::shared_ptr<JobState> job,
           Settings settings);
  ImapFeed(const ImapFeed&) = delete;
  ImapFeed& operator=(const ImapFeed&) = delete;
  /// Cancels the tasks not yet started, those queued in a worker's pipe
  /// too; the input is read no further.
  ~ImapFeed();

  const JobState& job() const { return *job_; }
  std::optional<std::size_t> total() const { return settings_.total; }

  /// Whether anything more is to come: an outcome, or the input's error.
  bool more();

  /// Whether outcomes taken are waiting: next() returns one without waiting.
  bool has_taken() const { return !batch_.empty(); }

  /// One chunk's outcome, with the input positions it covers; or, once every
  /// result before it was handed over, the input's own exception.
  struct Piece {
    ChunkOutcome outcome;
    std::size_t first = 0;  // index of the chunk's first input
    std::size_t count = 0;  // its items
    std::exception_ptr input_error;
  };

  /// The next piece, waiting for it until `deadline`; call only while more().
  /// @throws TimeoutError nothing arrived in time.
  Piece next(Deadline deadline);

 private:
  /// Keeps up to `prefetch` chunks in flight, reading the input only that
  /// far, and fewer while their bytes (tasks sent, results not yet taken,
  /// and results still to come) pass `prefetch_bytes`. An input that throws ends the input there: the
  /// results before it are still yielded, then its exception, in the
  /// position where it happened.
  void top_up();

  /// Whether one more chunk may be read, with `pending` chunks of
  /// `pending_bytes` read but not yet submitted.
  bool room_for_more(std::size_t pending, std::size_t pending_bytes) const;

  void pull_chunks(std::vector<Chunk>& chunks);

  /// The size of the next chunk: the fixed chunksize, or with adaptive
  /// chunking about `adaptive_chunk_time` of work at the recent time per
  /// item, and at most half a worker's share of what is left of a sized input.
  std::size_t next_chunksize() const;

  struct Span {
    std::size_t first;  // index of the chunk's first input
    std::size_t count;  // its items
  };

  std::shared_ptr<Engine> dispatcher_;
  std::unique_ptr<ChunkSource> source_;
  std::shared_ptr<JobState> job_;
  const Settings settings_;
  std::uint64_t submitted_ = 0;  // chunks handed to the dispatcher
  std::uint64_t taken_ = 0;      // chunks taken from the mailbox
  std::size_t next_input_ = 0;
  bool input_done_ = false;
  std::unordered_map<std::uint64_t, Span> spans_;
  std::exception_ptr input_error_;                            // the input threw; yielded after what came before it
  std::deque<std::pair<std::uint64_t, ChunkOutcome>> batch_;  // taken, not yet decoded
};

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE void ImapFeed::top_up() {
  if (input_done_ || !room_for_more(0, 0)) return;
  // Refills in batches of a quarter of the prefetch: one submission (and
  // one wake-up of the I/O thread) per batch, not per chunk taken.
  const std::uint64_t out = submitted_ - taken_;
  if (out != 0 && out + std::max<std::size_t>(1, settings_.prefetch / 4) > settings_.prefetch) return;
  std::vector<Chunk> chunks;
  try {
    pull_chunks(chunks);
  } catch (...) {
    input_done_ = true;
    input_error_ = std::current_exception();
  }
  if (chunks.empty()) return;
  const std::size_t count = chunks.size();
  std::vector<std::size_t> sizes;
  for (const auto& chunk : chunks) sizes.push_back(chunk.frame.size());
  // Counted before they go, or an answer could come first. Refused, they
  // stay counted: nothing more is sent.
  job_->sending(submitted_, sizes);
  try {
    dispatcher_->submit(std::move(chunks));
  } catch (...) {
    // Refused (the pool was closed meanwhile): they are not waited for,
    // the input is read no further, and the refusal comes after the
    // results submitted before it, as an input's own exception would.
    for (std::uint64_t index = submitted_; index < submitted_ + count; ++index) spans_.erase(index);
    input_done_ = true;
    input_error_ = std::current_exception();  // it comes before any error the input raised after
    return;
  }
  submitted_ += count;
}

PROCPOOL_ENGINE_INLINE bool ImapFeed::room_for_more(std::size_t pending, std::size_t pending_bytes) const {
  // Adaptive chunks of one item until a first chunk has been timed, and
  // only a few of them: chunks sized blind would be sized wrong.
  const std::uint64_t out = submitted_ + pending - taken_;
  if (settings_.chunksize == adaptive && out >= 2 * dispatcher_->processes() && !job_->item_ns()) return false;
  // What Flow::room() would say, without the job's lock, which the I/O
  // thread may hold: with nothing out the floor lets one chunk go, and
  // without a byte bound only the count matters.
  if (out == 0 || settings_.prefetch_bytes == 0) return out < settings_.prefetch;
  // Results still to come count as large as the largest so far. Until the
  // first has come, two chunks per worker go out: results too large for
  // the bound cannot pile up unseen.
  return job_->room({.bytes = settings_.prefetch_bytes,
                     .floor = 1,
                     .most = settings_.prefetch,
                     .blind = 2 * dispatcher_->processes(),
                     .results = true},
                    pending, pending_bytes);
}

PROCPOOL_ENGINE_INLINE void ImapFeed::pull_chunks(std::vector<Chunk>& chunks) {
  std::size_t pending_bytes = 0;
  while (!input_done_ && room_for_more(chunks.size(), pending_bytes)) {
    Chunk chunk{job_, submitted_ + chunks.size(), dispatcher_->new_frame(), {}};
    std::size_t start = begin_task_frame(chunk.frame, source_->handler_id());
    std::uint32_t count = source_->fill(chunk.frame, chunk.shares, next_chunksize());
    if (count == 0) {
      input_done_ = true;
      break;
    }
    finish_task_frame(chunk.frame, start, count);
    spans_.emplace(chunk.index, Span{next_input_, std::size_t{count}});
    pending_bytes += chunk.frame.size();
    next_input_ += count;
    chunks.push_back(std::move(chunk));
  }
}

PROCPOOL_ENGINE_INLINE std::size_t ImapFeed::next_chunksize() const {
  if (settings_.chunksize != adaptive) return settings_.chunksize;
  constexpr std::size_t most = std::size_t{1} << 16;
  const auto per_item = job_->item_ns();
  if (!per_item) return 1;
  const double target = std::chrono::duration<double, std::nano>(adaptive_chunk_time).count();
  std::size_t size = *per_item * static_cast<double>(most) <= target
                         ? most
                         : std::max<std::size_t>(1, static_cast<std::size_t>(target / *per_item));
  if (settings_.total && *settings_.total > next_input_) {
    const std::size_t share = (*settings_.total - next_input_) / (2 * dispatcher_->processes());
    size = std::min(size, std::max<std::size_t>(1, share));
  }
  return size;
}

PROCPOOL_ENGINE_INLINE ImapFeed::ImapFeed(std::shared_ptr<Engine> dispatcher, std::unique_ptr<ChunkSource> source,
                                          std::shared_ptr<JobState> job, Settings settings)
    : dispatcher_(std::move(dispatcher)), source_(std::move(source)), job_(std::move(job)), settings_(settings) {}

PROCPOOL_ENGINE_INLINE ImapFeed::~ImapFeed() {
  if (dispatcher_->forked_copy()) return;  // its tasks are the parent's
  job_->cancel();
  if (submitted_ == taken_) return;
  try {
    dispatcher_->withdraw(*job_);
  } catch (...) {  // a lock that cannot be taken: they run, and nobody reads them
  }
}

PROCPOOL_ENGINE_INLINE bool ImapFeed::more() {
  dispatcher_->require_owner();  // before reading the input, or the parent's buffers
  if (!batch_.empty()) return true;
  top_up();
  return taken_ < submitted_ || input_error_ != nullptr;
}

PROCPOOL_ENGINE_INLINE ImapFeed::Piece ImapFeed::next(Deadline deadline) {
  dispatcher_->require_owner();
  if (batch_.empty()) {
    top_up();
    if (taken_ == submitted_ && input_error_) return Piece{{}, 0, 0, std::exchange(input_error_, nullptr)};
    // The first fill is small (results' size unknown); in order, the first
    // result may be a slow one. Once any result is in, the rest goes out.
    if (settings_.ordered && !input_done_ && taken_ < submitted_ && job_->delivered() == 0 &&
        job_->wait_delivered(1, deadline)) {
      top_up();
    }
    // A batch of what is ready at once, bounded like the prefetch.
    auto got = job_->take_some(settings_.ordered ? std::optional<std::uint64_t>(taken_) : std::nullopt, deadline,
                               std::max<std::size_t>(1, settings_.prefetch / 4),
                               settings_.prefetch_bytes == 0 ? SIZE_MAX : settings_.prefetch_bytes / 4);
    if (got.empty()) throw TimeoutError(fmt::format("procpool: no {} result arrived in time", job_->call()));
    taken_ += got.size();
    for (auto& taken : got) batch_.push_back(std::move(taken));
  }
  // One at a time: if decoding one throws, the rest are still there.
  auto [index, outcome] = std::move(batch_.front());
  batch_.pop_front();
  const Span span = spans_.extract(index).mapped();
  return Piece{std::move(outcome), span.first, span.count, nullptr};
}

}  // namespace procpool::detail
#endif

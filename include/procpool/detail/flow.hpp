// procpool - flow control: how much of one call may be out at once. The one
// back-pressure of map and imap; a call asks room() before it sends more.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <vector>

namespace procpool::detail {

/// What a call lets out at once. A synchronous map decodes its results as
/// they come, on its own thread; an imap's caller takes them when it will.
struct FlowLimits {
  /// Bytes held at most: task messages sent and not yet answered; when the
  /// caller takes the results (`results`), task messages of chunks not yet
  /// taken, the results delivered and not yet taken, and those still to
  /// come, each counted as large as the largest so far. 0: no bound
  /// (Options::imap_prefetch_bytes).
  std::size_t bytes = 0;
  /// Chunks out that are always allowed, whatever their bytes: at least one,
  /// or nothing would ever run. A chunk is out until answered, or, with
  /// `results`, until taken.
  std::size_t floor = 1;
  /// Chunks sent and not yet taken, at most (Options::imap_prefetch).
  std::size_t most = std::numeric_limits<std::size_t>::max();
  /// Before any result has come, chunks unanswered at most: results of an
  /// unknown size cannot pile up unseen.
  std::size_t blind = std::numeric_limits<std::size_t>::max();
  /// The caller takes the results (imap), so they count as held until taken.
  bool results = false;
};

/// One call's chunks out: the task bytes of those sent and not yet answered,
/// and of those not yet taken; the result bytes delivered and not yet taken;
/// the largest result so far. Not thread-safe: JobState holds it under its
/// lock.
class Flow {
 public:
  /// Chunks `first`, `first + 1`, ... with task messages of `bytes[i]` bytes
  /// are about to be sent (numbered on from those sent before): out until
  /// answered, and until taken. Before they are sent, so an answer cannot
  /// come first.
  void sending(std::uint64_t first, const std::vector<std::size_t>& bytes) {
    if (chunks_.empty()) base_ = first;
    for (std::size_t b : bytes) {
      chunks_.push_back({b, false, false});
      unanswered_bytes_ += b;
      untaken_bytes_ += b;
    }
    unanswered_ += bytes.size();
    sent_ = std::max<std::uint64_t>(sent_, first + bytes.size());
  }

  /// Chunk `chunk` was answered with `result_bytes` of results.
  void answered(std::uint64_t chunk, std::size_t result_bytes) {
    ++delivered_;
    ready_bytes_ += result_bytes;
    largest_ = std::max(largest_, result_bytes);
    Sent* sent = find(chunk);
    if (sent == nullptr || sent->answered) return;
    sent->answered = true;
    unanswered_bytes_ -= sent->bytes;
    --unanswered_;
    drop_settled();
  }

  /// The caller took chunk `chunk`'s result of `result_bytes` bytes.
  void taken(std::uint64_t chunk, std::size_t result_bytes) {
    ++taken_;
    ready_bytes_ -= std::min(ready_bytes_, result_bytes);
    Sent* sent = find(chunk);
    if (sent == nullptr || sent->taken) return;
    sent->taken = true;
    untaken_bytes_ -= sent->bytes;
    drop_settled();
  }

  /// Whether `pending` more chunks (read, not yet counted by sending()),
  /// holding `pending_bytes` of task messages, fit within `limits`.
  bool room(const FlowLimits& limits, std::size_t pending, std::size_t pending_bytes) const {
    const std::uint64_t untaken = sent_ - std::min<std::uint64_t>(sent_, taken_) + pending;
    if (untaken >= limits.most) return false;
    const std::uint64_t out = limits.results ? untaken : unanswered_ + pending;
    if (out < limits.floor || limits.bytes == 0) return true;
    const std::uint64_t coming = unanswered_ + pending;
    if (delivered_ == 0 && coming >= limits.blind) return false;
    if (!limits.results) return unanswered_bytes_ + pending_bytes < limits.bytes;
    return untaken_bytes_ + pending_bytes + ready_bytes_ + coming * largest_ < limits.bytes;
  }

  /// Results delivered and not yet taken, in bytes.
  std::size_t ready_bytes() const { return ready_bytes_; }
  /// Chunks answered so far.
  std::size_t delivered() const { return delivered_; }

 private:
  struct Sent {
    std::size_t bytes;  // its task message's
    bool answered;
    bool taken;
  };

  Sent* find(std::uint64_t chunk) {
    return chunk < base_ || chunk - base_ >= chunks_.size() ? nullptr : &chunks_[chunk - base_];
  }
  void drop_settled() {
    while (!chunks_.empty() && chunks_.front().answered && chunks_.front().taken) {
      chunks_.pop_front();
      ++base_;
    }
  }

  std::deque<Sent> chunks_;  // chunks base_, base_ + 1, ... counted by sending(), until answered and taken
  std::uint64_t base_ = 0;
  std::size_t unanswered_bytes_ = 0;  // task bytes of chunks not answered
  std::size_t untaken_bytes_ = 0;     // task bytes of chunks not taken
  std::size_t unanswered_ = 0;        // chunks not answered
  std::uint64_t sent_ = 0;            // one past the highest chunk sending() counted
  std::uint64_t taken_ = 0;           // results the caller took
  std::size_t delivered_ = 0;
  std::size_t ready_bytes_ = 0;
  std::size_t largest_ = 0;
};

}  // namespace procpool::detail

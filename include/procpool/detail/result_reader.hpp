// procpool - reads what a worker sends and settles the tasks it answers:
// bytes from its Link in, deliveries for the jobs out. Any message a worker
// may not send, or cannot have meant, breaks the protocol: the worker is
// killed and its tasks settled as for any death.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "estimate.hpp"
#include "protocol.hpp"
#include "serialize.hpp"
#include "shm.hpp"
#include "worker_state.hpp"

namespace procpool::detail {

/// Takes a worker that broke the protocol for dead: kills it, and its
/// running task fails with `why`. Returns false, for the reader's callers.
inline bool protocol_violation(Worker& w, std::string why) {
  w.failure = ChunkFailure{ChunkFailure::Kind::protocol, w.pid(), w.slot, 0, std::move(why), w.where()};
  w.link->kill(SIGKILL);
  w.eof = true;
  w.inbox.clear();
  w.partial_since.reset();
  if (w.link->end_fd() < 0) w.exited = true;
  return false;
}

class ResultReader {
 public:
  /// `task_time` learns each task's run time; `timeouts_used` says whether
  /// the running tasks' start times are kept.
  ResultReader(std::size_t max_message, std::size_t shm_threshold, RunTimeEstimate& task_time,
               const bool& timeouts_used)
      : max_message_(max_message),
        shm_threshold_(shm_threshold),
        task_time_(task_time),
        timeouts_used_(timeouts_used) {}

  /// Set once a worker said its initializer failed.
  std::optional<ChunkFailure> init_failure;

  /// Reads what the worker sent; returns false at its end (or when the
  /// worker broke the protocol and was killed). Without `to_end`, a short
  /// read ends it: nothing more is there, and poll() tells when there is.
  bool read(Worker& w, std::vector<Delivery>& deliveries, bool to_end = true) {
    for (;;) {
      std::span<char> space = w.inbox.space();
      const long n = w.link->receive(space);
      if (n == 0) {
        // Without an end_fd, the end of its results is the death notice.
        if (w.link->end_fd() < 0) w.exited = true;
        return false;
      }
      if (n == Link::nothing_yet) return true;
      if (n < 0) return false;  // broken: no more results, though the process may live on
      w.inbox.commit(static_cast<std::size_t>(n));
      if (!parse(w, deliveries)) return false;
      // Part of a message is in: from now, more of it must come.
      if (w.inbox.partial()) {
        w.partial_since = Clock::now();
      } else {
        w.partial_since.reset();
      }
      if (!to_end && static_cast<std::size_t>(n) < space.size()) return true;
    }
  }

  /// Whether a worker may send messages of this kind.
  static bool from_worker(FrameKind kind) {
    switch (kind) {
      case FrameKind::started:
      case FrameKind::ready:
      case FrameKind::result:
      case FrameKind::init_failed:
      case FrameKind::fatal:
      case FrameKind::leaving:
      case FrameKind::shm_ref:
      case FrameKind::shm_announce:
      case FrameKind::shm_drop:
      case FrameKind::shm_share:
        return true;
      default:
        return false;
    }
  }

  /// SharedMemory blocks one result may refer to, at most (a bound on what a
  /// worker can make the parent hold before it sends the result).
  static constexpr std::size_t max_shares_per_result = std::size_t{1} << 20;

 private:
  /// Handles every complete frame in the worker's inbox; false if the worker
  /// broke the protocol.
  bool parse(Worker& w, std::vector<Delivery>& deliveries) {
    for (;;) {
      FrameView frame{};
      Parse parsed = w.inbox.next(frame);
      if (parsed == Parse::need_more) {
        // A message that cannot be one of a worker's is refused at its header.
        if (auto kind = w.inbox.front_kind(); kind && !from_worker(static_cast<FrameKind>(*kind))) {
          return protocol_violation(w, fmt::format("the worker sent an unknown message kind {}", *kind));
        }
        return true;
      }
      if (parsed == Parse::too_large) {
        return protocol_violation(
            w, fmt::format("the worker sent a message of {} bytes, over Options::max_message_bytes ({})",
                           w.inbox.front_length(), max_message_));
      }
      if (!handle(w, frame, deliveries)) return false;
    }
  }

  bool handle(Worker& w, const FrameView& frame, std::vector<Delivery>& deliveries) {
    switch (frame.kind) {
      case FrameKind::started:
        if (w.stage == Stage::starting) {
          w.stage = Stage::started;
          w.front_since = Clock::now();  // its initializer's clock
        }
        return true;
      case FrameKind::ready: {
        ReadyMessage ready;
        if (!ReadyMessage::decode(frame, ready)) return protocol_violation(w, "the worker sent a malformed ready");
        w.stage = Stage::ready;
        w.shm = shm_threshold_ != 0 && ready.shm;
        w.claiming = w.claims && ready.claims;
        w.front_since = Clock::now();  // its initializer's time is not its first task's
        return true;
      }
      case FrameKind::result:
        return take_result(w, frame, nullptr, deliveries);
      case FrameKind::shm_announce:
        if (!w.shm) return protocol_violation(w, "the worker sent a shared-memory message it was not to send");
        if (!w.shm_reader.adopt(frame, w.pid()) && !w.shm_refused) {
          // Tell it once, so it stops waiting for us to map its buffers.
          w.shm_refused = true;
          TaskBytes off;
          encode_empty(off, FrameKind::shm_off);
          w.link->send(std::make_shared<TaskBytes>(std::move(off)));
        }
        return true;
      case FrameKind::shm_drop:
        w.shm_reader.forget(frame);
        return true;
      case FrameKind::shm_share:
        return take_share(w, frame);
      case FrameKind::shm_ref:
        return take_shm_result(w, frame, deliveries);
      case FrameKind::leaving:
        w.leaving = true;
        return true;
      case FrameKind::init_failed:
      case FrameKind::fatal:
        take_failure(w, frame);
        return true;
      default:
        return protocol_violation(w, fmt::format("the worker sent an unknown message kind {}",
                                                 static_cast<std::uint32_t>(frame.kind)));
    }
  }

  /// A result in the worker's shared memory.
  bool take_shm_result(Worker& w, const FrameView& frame, std::vector<Delivery>& deliveries) {
    if (!w.shm) return protocol_violation(w, "the worker sent a shared-memory message it was not to send");
    ShmReader::Resolved resolved;
    try {
      resolved = w.shm_reader.resolve(frame, max_message_);
    } catch (const std::exception& e) {
      return protocol_violation(w, fmt::format("the worker's result in shared memory could not be read: {}", e.what()));
    }
    if (resolved.frame.kind != FrameKind::result) {
      return protocol_violation(w, "the worker sent something other than a result through shared memory");
    }
    return take_result(w, resolved.frame, std::move(resolved.mapping), deliveries);
  }

  /// The worker's initializer failed, or the worker cannot go on (fatal).
  void take_failure(Worker& w, const FrameView& frame) {
    std::string type, message;
    try {
      Decoder decoder(frame.data, frame.size);
      decoder(type, message);
    } catch (...) {
      type = "unknown";
    }
    const bool init = frame.kind == FrameKind::init_failed;
    ChunkFailure failure{init ? ChunkFailure::Kind::initializer : ChunkFailure::Kind::protocol,
                         w.pid(),
                         w.slot,
                         0,
                         message.empty() ? type : fmt::format("{}: {}", type, message),  // `throw 42`: "int"
                         w.where()};
    if (init) init_failure = failure;
    w.failure = failure;
  }

  /// Settles the task a result frame answers. `shared`: the mapping the frame
  /// is in, if it came through shared memory (the outcome then reads it in
  /// place and frees it for the worker once decoded).
  bool take_result(Worker& w, const FrameView& frame, std::shared_ptr<ShmMapping> shared,
                   std::vector<Delivery>& deliveries) {
    ResultHead head;
    std::span<const char> items;
    if (!ResultHead::decode(frame, head, items)) return protocol_violation(w, "the worker sent a truncated result");
    const std::uint64_t id = head.task_id, ns = head.run_ns;
    std::size_t k = 0;
    while (k < w.held.size() && w.held[k].id != id) ++k;
    if (k == w.held.size()) return protocol_violation(w, "the worker answered a task it was not given");
    Task& task = w.held[k];
    w.stalled = false;
    if (timeouts_used_) w.front_since = Clock::now();
    task_time_.add(static_cast<double>(ns));
    ChunkOutcome outcome;
    outcome.run_ns = ns;
    if (shared) {
      outcome.rare_part().shm = std::make_unique<ShmSlice>(std::move(shared), items.data(), items.size());
    } else {
      outcome.payload = w.inbox.take_large();  // a large result is not copied again
      if (outcome.payload.empty()) {
        outcome.copy_bytes(items.data(), items.size());
      } else {
        outcome.payload_offset = static_cast<std::size_t>(items.data() - outcome.payload.data());
      }
    }
    outcome.pid = w.pid();
    outcome.worker = w.slot;
    outcome.where = w.where();
    // The blocks the result refers to, all shared for it (even those its
    // task sent: they may go with the task).
    if (!w.shared.empty() || !w.share_failure.empty()) {
      outcome.rare_part().shares = std::exchange(w.shared, {});
      outcome.rare_part().share_failure = std::exchange(w.share_failure, {});
    }
    deliveries.push_back({std::move(task.job), task.chunk, std::move(outcome), task.items()});
    w.held.erase(k);  // frees the task's shared memory, if it used some
    return true;
  }

  /// A SharedMemory block the worker's next result refers to: maps it now,
  /// while the worker still holds it (it waits for that), and keeps it for
  /// that result. One it cannot map is left out, and decoding the result
  /// then fails with the reason.
  bool take_share(Worker& w, const FrameView& frame) {
    ShmLocation block;
    if (!ShmLocation::decode(frame, block)) {
      return protocol_violation(w, "the worker sent a malformed shm_share message");
    }
    if (w.shared.size() >= max_shares_per_result) {
      return protocol_violation(w, "the worker shared more SharedMemory blocks than a result can hold");
    }
    if (block.pid != w.pid()) return protocol_violation(w, "the worker shared another process's memory");
    try {
      auto state = open_shared_state(block.pid, block.fd, block.id, block.size);
      state->header().mark_mapped();
      w.shared.push_back(std::move(state));
    } catch (const std::exception& e) {
      if (w.share_failure.empty()) w.share_failure = e.what();
    }
    // Mapped or not: the worker stops waiting once all it shared is handled.
    w.claims.share_handled();
    return true;
  }

  const std::size_t max_message_;
  const std::size_t shm_threshold_;
  RunTimeEstimate& task_time_;
  const bool& timeouts_used_;
};

}  // namespace procpool::detail

// procpool - what the dispatcher knows of each worker and of each task it
// holds. The parent always knows which tasks each worker holds: `held`.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "claims.hpp"
#include "inbox.hpp"
#include "job.hpp"
#include "link.hpp"
#include "protocol.hpp"
#include "ring.hpp"
#include "shm.hpp"

namespace procpool::detail {

/// A chunk inside the dispatcher. Its frame is kept until the result
/// arrives, so a task a dead worker never started can be sent again.
struct Task {
  std::shared_ptr<JobState> job;
  std::uint64_t chunk = 0;
  std::uint64_t id = 0;  // its task id, once sent
  std::shared_ptr<TaskBytes> frame;
  std::size_t attempts = 0;  // how often a worker died running it
  ShmLease shm;              // the shared memory a frame on the heap was copied into, until the worker is done with it
  SharedStates shares;       // the SharedMemory blocks the frame refers to

  std::size_t items() const { return TaskHead::count_of(*frame); }
};

/// A chunk's outcome on its way to its job, delivered outside the lock.
struct Delivery {
  std::shared_ptr<JobState> job;
  std::uint64_t chunk;
  ChunkOutcome outcome;
  std::size_t items;  // in the chunk, for progress reports
};

inline ChunkOutcome failure_outcome(ChunkFailure failure) {
  ChunkOutcome outcome;
  outcome.rare_part().failure = std::move(failure);
  return outcome;
}

/// Where a worker is in its life. Each stage implies the ones before it.
enum class Stage {
  starting,  // launched; it has not reached procpool's worker loop yet
  started,   // it reached the loop and runs its initializer
  ready,     // it finished its initializer and takes tasks
};

/// One worker. A slot (0 .. processes-1) has one worker taking tasks, plus,
/// while it finishes its last maxtasksperchild tasks, the one it replaces:
/// replacements start before the old worker exits.
struct Worker {
  std::size_t slot = 0;
  std::unique_ptr<Link> link;  // how to reach it (link.hpp)
  Stage stage = Stage::starting;
  bool shm = false;            // it can reach the pool's shared memory (said so when ready)
  ShmReader shm_reader{true};  // its result buffers it announced, mapped
  SharedStates shared;         // SharedMemory blocks it shared (shm_share) for its next result
  std::string share_failure;   // why one of them could not be mapped
  bool shm_refused = false;    // one of them could not be mapped: it was told to stop (shm_off)
  bool retiring = false;       // it was sent its last task
  bool eof = false;            // it will send nothing more (end of its results, or it broke the protocol)
  bool exited = false;         // its process is gone (end_fd fired, or found by try_reap)
  Ring<Task> held;             // the tasks sent and not answered, in order: the front one runs
  std::size_t sent = 0;
  ClaimArea claims;           // the claim words of its tasks (claims.hpp)
  bool claiming = false;      // it said (when ready) that it claims each task: tasks may be taken back
  bool stalled = false;       // tasks were taken back from it: it gets no more until it answers or skips them
  std::uint64_t last_id = 0;  // the id (sequence number) of the last task sent to it
  Inbox inbox;
  std::optional<ChunkFailure> failure;             // why its running task fails, if not a plain death
  std::optional<int> status;                       // wait status, once reaped
  bool leaving = false;                            // it said it exits before its queued tasks (memory cap)
  Clock::time_point front_since{};                 // when held.front() started (or its initializer), near enough
  std::optional<Clock::time_point> kill_at;        // SIGKILL then, after a SIGTERM for a timeout
  std::optional<Clock::time_point> partial_since;  // it sent part of a message, and nothing more since then
  std::optional<Clock::time_point> unread_since;   // since when held.front() (unread_id) has waited unread
  std::uint64_t unread_id = 0;

  pid_t pid() const noexcept { return link->pid(); }
  std::shared_ptr<const std::string> where() const { return link->where(); }
  bool ready() const noexcept { return stage == Stage::ready; }
  bool takes_tasks() const { return !retiring && !leaving && !eof && !exited && !failure && link->sending(); }
};

}  // namespace procpool::detail

// procpool - what a pool and its calls need of their dispatcher: the Engine
// interface. The public templates see only this, so they compile without the
// dispatcher's own headers; dispatcher.hpp implements it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "job.hpp"
#include "shm.hpp"

namespace procpool::detail {

/// One task on its way to a worker: a serialized task frame and where its
/// outcome goes.
struct Chunk {
  std::shared_ptr<JobState> job;
  std::uint64_t index = 0;  // the chunk's number within its job
  TaskBytes frame;          // a task frame (from Engine::new_frame()); the dispatcher stamps the task id
  SharedStates shares;      // the SharedMemory blocks the frame refers to: held until the task is settled
};

class Engine : public JobHost {
 public:
  /// terminate(), then runs the callbacks still queued (error_callbacks of
  /// what terminate() failed among them) and ends the callback thread. Called
  /// by ~Pool while the Pool is whole, so a callback may still use it.
  virtual void shutdown() noexcept = 0;

  virtual std::size_t processes() const = 0;

  /// Whether this is a copy of the pool, in a child its process made with
  /// fork(): the workers and threads stay with the parent. Used there, the
  /// pool throws PoolNotRunning, or does nothing where it must not throw.
  virtual bool forked_copy() const noexcept = 0;
  virtual void require_owner() const = 0;

  /// An empty task frame to encode a chunk into: once large, it grows in the
  /// pool's shared memory, where the worker will read it.
  virtual TaskBytes new_frame() const = 0;

  /// Most tasks a worker may hold at once (Options::max_tasks_in_flight).
  virtual std::size_t max_tasks_per_worker() const = 0;

  /**
   * For a call that submits its chunks in several batches: once it has
   * opened a stream, close() refuses none of its later batches (submitted
   * with `in_stream`), and the pool does not wind down before it is closed.
   * Every open_stream() needs its close_stream().
   */
  virtual void open_stream() = 0;
  virtual void close_stream() noexcept = 0;

  /// Whether terminate() was called: a call still reading its input stops.
  virtual bool terminated() const noexcept = 0;

  /// Throws PoolNotRunning unless the pool takes new work.
  virtual void require_running() = 0;

  /// Queues chunks; they are failed at once if the pool can no longer run them.
  void submit(std::vector<Chunk> chunks) { submit_from(chunks, false); }

  /// submit(), taking the chunks out of `chunks`: it is left empty, with
  /// its capacity, for a caller's next batch.
  virtual void submit_from(std::vector<Chunk>& chunks, bool in_stream) = 0;

  /// No more submissions; queued work still runs.
  virtual void close() = 0;

  /// After close(): waits for all queued work, then for every worker to exit.
  virtual void join() = 0;

  /// Stops the workers now (idle ones on EOF, busy ones by SIGTERM; SIGKILL
  /// after a short grace) and fails every unfinished task. Never throws,
  /// never hangs.
  virtual void terminate() noexcept = 0;
};

}  // namespace procpool::detail

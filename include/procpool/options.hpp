/// @file
/// The settings of a pool: procpool::Options.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>

#include "backend.hpp"
#include "initializer.hpp"
#include "start_method.hpp"
#include "worker_output.hpp"

namespace procpool {

/// The fewest chunks `imap`/`imap_unordered` submit ahead of the consumer
/// when `Options::imap_prefetch` is 0 (automatic).
inline constexpr std::size_t imap_default_prefetch = 1024;

/**
 * Settings of a `procpool::Pool`, used with designated initializers; every
 * field has a default, so name only what you change:
 *
 * @code
 * procpool::Pool pool({.processes = 4, .maxtasksperchild = 100});
 * @endcode
 *
 * New fields are only ever added at the end.
 *
 * A plain value without locks. A pool copies what it needs when it is
 * constructed; later changes to the Options do not reach it.
 */
struct Options {
  /// Number of worker processes; 0 means `procpool::cpu_count()`.
  std::size_t processes = 0;
  /// How workers are started; see `StartMethod`. The default, forkserver, is
  /// safe in threaded programs and needs `procpool::init` in main().
  StartMethod start_method = StartMethod::forkserver;
  /// A worker exits after this many tasks (a chunk counts as one) and is
  /// replaced; 0 means never. Bounds the damage of leaky task code.
  std::size_t maxtasksperchild = 0;
  /// Runs once in each worker before its first task.
  Initializer initializer{};
  /// Upper bound on tasks (chunks) sent to one worker ahead of its results,
  /// so it never waits for the parent between short tasks. The pool sends
  /// only one at a time while tasks take longer than about a millisecond,
  /// so long tasks are never queued behind each other on one worker.
  std::size_t max_tasks_in_flight = 8;
  /// How many chunks `imap`/`imap_unordered` submit ahead of the consumer;
  /// bounds their memory whatever the input's length. 0 means the larger of
  /// `imap_default_prefetch` (1024) and `4 * processes * max_tasks_in_flight`:
  /// enough queued that the workers keep busy with short tasks while the
  /// consumer's thread waits for a CPU. With chunksize `procpool::adaptive`
  /// (chunks of about 2 ms of work), 0 means `4 * processes * max_tasks_in_flight`.
  std::size_t imap_prefetch = 0;
  /// Largest message a worker may send or receive, in bytes; a larger one
  /// fails its task with `ProtocolError` instead of being allocated.
  std::size_t max_message_bytes = std::size_t{1} << 30;
  /// With StartMethod::fork in a program running other threads, throw
  /// `procpool::Error` instead of warning once on stderr.
  bool error_on_threaded_fork = false;
  /// How often a task whose worker died (WorkerLost) is run again on another
  /// worker before it fails. Only for idempotent work. Timeouts are not retried.
  std::size_t retries = 0;
  /// A task (a chunk) running longer than this has its worker stopped
  /// (SIGTERM, SIGKILL 200 ms later) and fails with `procpool::TaskTimeout`;
  /// the worker is replaced. It bounds each worker's initializer too: one
  /// that runs longer fails the pool's calls with InitializerError. 0 means
  /// no limit.
  std::chrono::milliseconds task_timeout{0};
  /// A worker whose resident memory of its own (heap and stacks, not pages
  /// it shares with other processes, such as a forked parent's pages
  /// neither has written since) exceeds this many bytes after a task exits
  /// and is replaced (its queued tasks run elsewhere). 0 means no limit.
  std::size_t max_memory_per_child = 0;
  /// Hard limit in bytes on the address space a worker's tasks may add to
  /// what it has mapped at start (RLIMIT_AS): an allocation beyond it fails
  /// inside the task (`std::bad_alloc`, reported as RemoteError), and the
  /// worker is replaced after that task. 0 means no limit. Does not mix with
  /// AddressSanitizer.
  std::size_t memory_limit_per_child = 0;
  /// `imap`/`imap_unordered` read no further ahead while their tasks not yet
  /// answered and the results not yet consumed hold this many bytes, results
  /// still to come counted as large as the largest so far (at least one
  /// chunk is always in flight); bounds their memory with large items or
  /// results, where `imap_prefetch` alone counts chunks. `map`/`starmap` start no
  /// further batch of tasks while their tasks not yet answered (sent or queued) hold
  /// this many bytes, unless fewer are out than `processes *
  /// (max_tasks_in_flight + 1)`. 0 means no byte bound.
  std::size_t imap_prefetch_bytes = std::size_t{64} << 20;
  /// What becomes of the workers' stdout and stderr: `inherit` (the parent's
  /// own, as any child's; lines of two workers can mix), `lines` (relayed
  /// through the parent, one whole line at a time) or `prefixed` (relayed,
  /// each line led by `[worker <slot> pid <pid>] `). See `WorkerOutput`.
  WorkerOutput worker_output = WorkerOutput::inherit;
  /// If set, every line a worker prints on stdout or stderr goes to this
  /// function instead of the parent's stdout and stderr (whatever
  /// `worker_output` says): the way to route worker output into the
  /// program's own logger. Called on a thread of the pool, one line at a time;
  /// keep it short. An exception it throws is reported on stderr and the pool
  /// goes on. Every line printed before `join()` returns has been delivered
  /// by then.
  std::function<void(const WorkerLine&)> on_worker_output{};
  /// A task or result message larger than this many bytes travels through
  /// shared memory instead of its worker's pipe: it is put in a memory file
  /// (memfd) its sender keeps for reuse (a task message is encoded straight
  /// into the pool's), and the receiver reads it in place, which saves two
  /// copies and the pipe's many wake-ups. Needs
  /// memfd_create and /proc; where a worker cannot open the pool's memory
  /// (another user, /proc not mounted), that worker's messages go through its
  /// pipe. Each side keeps up to a few idle buffers for reuse, so a worker
  /// that returned a large result holds that much shared memory. 0 sends
  /// everything through the pipes.
  std::size_t shared_memory_threshold = std::size_t{256} << 10;
  /// A worker whose last task was short (under 200 µs) and which has run out
  /// of tasks while the parent had more of a `map`-like call queued looks
  /// for its next task for up to 50 µs before it sleeps: waking a sleeping
  /// process costs more than such a task. The look spends CPU, less after
  /// looks that found nothing. `imap`/`imap_unordered` never ask for it.
  /// false: workers sleep at once (fewer CPU cycles, slower tiny tasks).
  bool worker_spin = true;
  /// A task's exception of a type procpool can make (the `<stdexcept>` types,
  /// `std::bad_alloc`, those given to `procpool::register_exception`) is
  /// thrown in the caller as that type, with the `RemoteError` nested in it
  /// (`std::rethrow_if_nested`), as Python re-raises the original; others
  /// still as `RemoteError`. An `error_callback` still gets the RemoteError.
  /// false (the default): always `RemoteError`, whose `rethrow()` does the
  /// same on request.
  bool raise_original_exceptions = false;
  /// Where the workers run: processes on this machine (the default), or on
  /// MPI ranks with `procpool::mpi::world()` or `procpool::mpi::spawn(n)`
  /// (`<procpool/mpi.hpp>`, docs/mpi.md).
  Backend backend{};
};

}  // namespace procpool

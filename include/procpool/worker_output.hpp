/// @file
/// What becomes of what workers print on stdout and stderr: procpool::WorkerOutput, procpool::WorkerLine.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <string>

namespace procpool {

/**
 * How a pool handles what its workers write to their stdout and stderr
 * (`Options::worker_output`).
 *
 * @code
 * procpool::Pool pool({.processes = 4, .worker_output = procpool::WorkerOutput::prefixed});
 * @endcode
 */
enum class WorkerOutput {
  /// Workers write straight to the parent's stdout and stderr, as any child
  /// process does. Costs nothing, but two workers printing at once can
  /// interleave in the middle of a line. The default.
  inherit,
  /// Each worker's stdout and stderr are pipes to the parent, which writes
  /// every line whole, with one `write()`, to its own stdout or stderr. Lines
  /// of different workers never mix.
  lines,
  /// As `lines`, each line led by `[worker <slot> pid <pid>] `.
  prefixed,
};

/// Which of a worker's streams a line came from.
enum class WorkerStream {
  out,  ///< the worker's stdout (fd 1)
  err,  ///< the worker's stderr (fd 2)
};

/**
 * One line a worker printed, as `Options::on_worker_output` receives it.
 *
 * @code
 * procpool::Pool pool({.on_worker_output = [](const procpool::WorkerLine& line) {
 *   my_logger.info("worker {} (pid {}): {}", line.worker, line.pid, line.text);
 * }});
 * @endcode
 *
 * A plain value without locks. The callback's reference is valid only during
 * the call: copy the line to keep it.
 */
struct WorkerLine {
  /// The worker's slot, 0 to `processes - 1` (a replacement takes its predecessor's slot).
  std::size_t worker = 0;
  /// The worker's process id.
  pid_t pid = 0;
  /// stdout or stderr.
  WorkerStream stream = WorkerStream::out;
  /// The line without its newline. A line longer than 64 KiB arrives in pieces
  /// of 64 KiB; a last line without a newline arrives when the worker exits.
  std::string text;
};

}  // namespace procpool

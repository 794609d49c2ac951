// procpool - the transport seam: how the dispatcher reaches one worker.
//
// A transport is a Transport, which starts workers, and the Link it hands
// back for each: the dispatcher sends frames (protocol.hpp) down a Link,
// reads the bytes of the worker's frames from it, and learns of the worker's
// end through it. It knows nothing else of pipes, processes or hosts. Today's
// transport is pipe_link.hpp (local processes, pipes and shared memory); a
// new one (MPI ranks) is a new Transport and Link in a file of their own.
#pragma once

#include <poll.h>
#include <sys/types.h>

#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>

#include "../cpu_count.hpp"
#include "shm.hpp"

namespace procpool::detail {

/// A start failure that trying again cannot mend (main() never calls
/// procpool::init): the pool stops starting workers.
class StartRefused : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  /// `ended`: the pool can run nothing more (its MPI ranks were let go),
  /// and its calls throw PoolNotRunning.
  StartRefused(const std::string& what, bool ended) : std::runtime_error(what), ended_(ended) {}
  bool ended() const noexcept { return ended_; }

 private:
  bool ended_ = false;
};

/// What a new worker gets as its stdout and stderr: the write ends of the
/// output relay's pipes, or -1 for both to keep the parent's (inherit).
struct ChildStdio {
  int out = -1;
  int err = -1;
  bool relayed() const noexcept { return out >= 0 && err >= 0; }
};

/// One started worker, as the dispatcher sees it. Used only on the
/// dispatcher's I/O thread, with the dispatcher's lock held or not.
class Link {
 public:
  virtual ~Link() = default;

  /// The worker's process id (on its host), for messages and failures.
  virtual pid_t pid() const noexcept = 0;
  /// Where it runs, for a worker on another host ("rank 2 on node7"), named
  /// in its errors after its pid; null for a worker on this machine.
  virtual std::shared_ptr<const std::string> where() const { return nullptr; }

  // ---- sending: the worker reads its messages in the order queued --------

  /// Queues one message: `head` (a task header, or nothing) then `frame`.
  /// The frame is shared, not copied: it may go to another worker later.
  virtual void send(std::shared_ptr<const TaskBytes> frame, std::span<const char> head = {}) = 0;
  /// Whether queued bytes wait for the worker to take them.
  virtual bool has_unsent() const noexcept = 0;
  /// Passes on what is queued, as far as it goes without blocking. A worker
  /// that is gone drops it; its end is learnt as any other.
  virtual void flush() noexcept = 0;
  /// False once close_sending() was called.
  virtual bool sending() const noexcept = 0;
  /// No more messages: the worker exits once it has run what it holds.
  virtual void close_sending() noexcept = 0;

  // ---- receiving: the bytes of the worker's messages, in order ------------

  /// Reads into `space` without blocking: the bytes read, 0 at the end (the
  /// worker will send nothing more: it is gone or going), `nothing_yet`, or
  /// `broken` (the channel failed: nothing more comes, but the worker may
  /// still be alive; its end is learnt through end_fd() or try_reap()).
  virtual long receive(std::span<char> space) noexcept = 0;
  static constexpr long nothing_yet = -1;
  static constexpr long broken = -2;

  // ---- waiting -----------------------------------------------------------

  /// The fds poll() watches for this worker: readable when receive() has
  /// something, writable when flush() can go on, readable once the worker
  /// has ended. -1 where there is none: then the dispatcher calls
  /// try_reap() now and then instead.
  virtual int receive_fd() const noexcept = 0;
  virtual int send_fd() const noexcept = 0;
  virtual int end_fd() const noexcept = 0;

  // ---- its end -------------------------------------------------------------

  /// Sends a signal to the worker; one already gone is not an error.
  virtual void kill(int sig) noexcept = 0;
  /// Its wait status if it has ended, without blocking.
  virtual std::optional<int> try_reap() = 0;
  /// Waits for it to end (it has, or was killed) and returns its wait status.
  virtual int reap() = 0;
  /// For a worker that ended normally: lets it go without waiting for news
  /// of it where that costs a round trip.
  virtual void release() { reap(); }
};

/// Starts workers and hands back their Links.
class Transport {
 public:
  virtual ~Transport() = default;
  /// Starts one worker, with `stdio` as its stdout and stderr when relayed
  /// and `claims_fd` as its claim area (claims.hpp; -1 for none). The caller
  /// keeps and closes both fds. Throws std::system_error, or StartRefused
  /// when trying again cannot help. Called only on the I/O thread.
  virtual std::unique_ptr<Link> start(const ChildStdio& stdio, int claims_fd) = 0;
  /// Whether workers share this machine's memory: claims and shared memory
  /// are offered only then.
  virtual bool shares_memory() const noexcept { return true; }
  /// What to tell the user when a worker dies before it is ready; an empty
  /// string where such a death may be retried (launcher.hpp).
  virtual std::string start_hint() const { return {}; }
  /// How many workers a pool makes when Options::processes is 0.
  virtual std::size_t default_processes() const { return cpu_count(); }
  /// After the last worker has ended: lets go of what the transport runs
  /// besides the workers.
  virtual void shutdown() noexcept {}
};

}  // namespace procpool::detail

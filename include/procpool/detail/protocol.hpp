// procpool - the wire protocol between parent and worker: length-prefixed
// frames over one pipe in each direction. Every message kind's layout is
// here, as a type with its encode and decode side by side; no other file
// knows an offset.
//
//   frame   := u32 payload length, u32 kind, payload
//   config  := u64 worker slot, u64 maxtasksperchild, u64 initializer id,
//              u64 max message bytes, u64 max resident bytes, u64 address-space
//              limit, u64 shared-memory threshold (0: none), i32 pool pid,
//              i32 probe fd, u64 probe id, initializer state
//   task_header := u64 task id (the worker's sequence number), u32 flags; the
//              task (or the shm_ref to it) follows. A task frame itself never
//              changes once encoded, so it can be sent again elsewhere.
//   task    := u64 handler id, u32 item count, callable state, items (cereal)
//   started := (empty) the worker reached its loop: a death from now on is not a missing init()
//   ready   := i32 pid, u32 flags: 1 it can reach the pool's shared memory, 2 it claims its tasks
//   result  := u64 task id, u64 run time in ns, per item (cereal): u8 ItemOutcome,
//              then the value (value), type and message (raised), or why (unsent)
//   init_failed / fatal := cereal strings: type, message
//   leaving := (empty)
//   shm_ref := where a frame too large for the pipe is (see shm.hpp)
//   shm_announce, shm_drop := a worker's result buffers coming and going (shm.hpp)
//   shm_off := (empty) the parent cannot map the worker's buffers
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace procpool::detail {

enum class FrameKind : std::uint32_t {
  config = 1,
  task = 2,
  ready = 3,
  result = 4,
  init_failed = 5,
  fatal = 6,
  leaving = 7,       // worker -> parent: I exit now, before the tasks I was sent after the last result
  shm_ref = 8,       // either way: the frame is in the sender's shared memory (shm.hpp)
  shm_announce = 9,  // worker -> parent: map this new result buffer of mine
  shm_drop = 10,     // worker -> parent: I unmapped this result buffer
  shm_off = 11,      // parent -> worker: I cannot map your buffers; send results through the pipe
  shm_share = 12,    // worker -> parent: my next result refers to this SharedMemory block; map it
  started = 13,      // worker -> parent: I run procpool's worker loop (before the initializer)
  task_header = 14,  // parent -> worker: the task that follows is this one (claims.hpp)
  stop = 15,         // parent -> worker: no more tasks; exit (as on EOF, which a forked copy of the pipe may withhold)
};

inline constexpr std::size_t frame_header_size = 8;
inline constexpr std::size_t task_prefix_size = frame_header_size + 8 + 4;
inline constexpr std::size_t task_count_offset = task_prefix_size - 4;  // the chunk's item count
/// Where a task's callable and items start, in its payload.
inline constexpr std::size_t task_body_offset = task_prefix_size - frame_header_size;
/// Most items in one chunk.
inline constexpr std::uint32_t max_chunk_items = 0x7fff'ffffu;
inline constexpr std::size_t task_header_size = frame_header_size + 8 + 4;
/// A task header flag, set when the parent had more tasks queued as it sent
/// the task: its worker, once out of tasks, looks for the next one a while
/// before sleeping (FrameReader::spin_when_idle()).
inline constexpr std::uint32_t task_more_queued = 1;
/// Bytes a task frame starts with room for.
inline constexpr std::size_t task_frame_reserve = 64;

// The writers below take any vector of bytes: a std::vector<char>, or a
// task frame being encoded into the pool's shared memory (TaskBytes).

template <class T, class Bytes>
void put(Bytes& out, T value) {
  const char* bytes = reinterpret_cast<const char*>(&value);
  out.insert(out.end(), bytes, bytes + sizeof(T));
}

template <class T>
T get(const char* data) {
  T value;
  std::memcpy(&value, data, sizeof(T));
  return value;
}

template <class T, class Bytes>
void patch(Bytes& out, std::size_t offset, T value) {
  std::memcpy(out.data() + offset, &value, sizeof(T));
}

/// Starts a frame: reserves the header, to be filled by finish_frame().
template <class Bytes>
std::size_t begin_frame(Bytes& out, FrameKind kind) {
  std::size_t start = out.size();
  put<std::uint32_t>(out, 0);
  put<std::uint32_t>(out, static_cast<std::uint32_t>(kind));
  return start;
}

template <class Bytes>
void finish_frame(Bytes& out, std::size_t start) {
  patch<std::uint32_t>(out, start, static_cast<std::uint32_t>(out.size() - start - frame_header_size));
}

/// Starts a task frame.
template <class Bytes>
std::size_t begin_task_frame(Bytes& frame, std::uint64_t handler) {
  // Room for the prefix and a few small items at once: growing from nothing
  // would take five allocations before a chunk of one number is encoded.
  frame.reserve(frame.size() + task_frame_reserve);
  std::size_t start = begin_frame(frame, FrameKind::task);
  put<std::uint64_t>(frame, handler);
  put<std::uint32_t>(frame, 0);
  return start;
}

template <class Bytes>
void finish_task_frame(Bytes& frame, std::size_t start, std::uint32_t count) {
  if (count > max_chunk_items) throw std::length_error("procpool: a chunk of 2^31 items or more");
  patch<std::uint32_t>(frame, start + task_count_offset, count);
  finish_frame(frame, start);
}

/// The header that goes before a task each time it is sent: which task it is
/// to the worker (its sequence number), and flags.
struct TaskHeader {
  std::uint64_t id = 0;
  std::uint32_t flags = 0;

  void encode(char (&out)[task_header_size]) const {
    const std::uint32_t length = task_header_size - frame_header_size;
    const auto kind = static_cast<std::uint32_t>(FrameKind::task_header);
    std::memcpy(out, &length, 4);
    std::memcpy(out + 4, &kind, 4);
    std::memcpy(out + 8, &id, 8);
    std::memcpy(out + 16, &flags, 4);
  }
  /// From a task_header frame's payload; false if it is not one.
  static bool decode(const char* payload, std::size_t size, TaskHeader& header) {
    if (size != task_header_size - frame_header_size) return false;
    std::memcpy(&header.id, payload, 8);
    std::memcpy(&header.flags, payload + 8, 4);
    return true;
  }
};

struct FrameView {
  FrameKind kind;
  const char* data;
  std::size_t size;
};

/// Outcome of looking for one frame at the front of a buffer.
enum class Parse { complete, need_more, too_large };

inline Parse parse_frame(const char* data, std::size_t available, std::size_t max_payload, FrameView& frame) {
  if (available < frame_header_size) return Parse::need_more;
  auto length = get<std::uint32_t>(data);
  if (length > max_payload) return Parse::too_large;
  if (available < frame_header_size + length) return Parse::need_more;
  frame = {static_cast<FrameKind>(get<std::uint32_t>(data + 4)), data + frame_header_size, length};
  return Parse::complete;
}

// ---- the task frame -------------------------------------------------------------

/// The start of a task frame's payload: which function, how many items. The
/// callable's state and the items follow, from task_body_offset.
struct TaskHead {
  std::uint64_t handler = 0;
  std::uint32_t count = 0;

  /// From a task frame; false if it is too short to be one.
  static bool decode(const FrameView& frame, TaskHead& head) {
    if (frame.kind != FrameKind::task || frame.size < task_body_offset) return false;
    head.handler = get<std::uint64_t>(frame.data);
    head.count = get<std::uint32_t>(frame.data + 8);
    return true;
  }
  /// The item count of an encoded task frame (header included).
  template <class Bytes>
  static std::uint32_t count_of(const Bytes& frame) {
    return get<std::uint32_t>(frame.data() + task_count_offset);
  }
};

// ---- results ---------------------------------------------------------------------

/// What each item of a result says, as its first byte.
enum class ItemOutcome : std::uint8_t {
  raised = 0,  ///< the task threw: its type's name and its message follow (cereal strings)
  value = 1,   ///< the value follows (cereal)
  unsent = 2,  ///< the worker could not send the result: why follows (a cereal string)
};

/// ItemOutcome as the byte on the wire.
constexpr std::uint8_t outcome_byte(ItemOutcome outcome) { return static_cast<std::uint8_t>(outcome); }

/// A result frame's head: which task it answers, and how long it ran.
struct ResultHead {
  std::uint64_t task_id = 0;
  std::uint64_t run_ns = 0;

  static constexpr std::size_t encoded_size = 8 + 8;

  /// Starts a result frame in `out` (the run time left 0); returns where it
  /// starts, for set_run_time(), items_start() and finish_frame().
  template <class Bytes>
  static std::size_t begin(Bytes& out, std::uint64_t task_id) {
    std::size_t start = begin_frame(out, FrameKind::result);
    put<std::uint64_t>(out, task_id);
    put<std::uint64_t>(out, 0);
    return start;
  }
  template <class Bytes>
  static void set_run_time(Bytes& out, std::size_t start, std::uint64_t ns) {
    patch<std::uint64_t>(out, start + frame_header_size + 8, ns);
  }
  /// Where the items of the result frame begun at `start` start.
  static std::size_t items_start(std::size_t start) { return start + frame_header_size + encoded_size; }

  /// From a result frame; `items` is set to what follows the head. False if
  /// it is too short.
  static bool decode(const FrameView& frame, ResultHead& head, std::span<const char>& items) {
    if (frame.size < encoded_size) return false;
    head.task_id = get<std::uint64_t>(frame.data);
    head.run_ns = get<std::uint64_t>(frame.data + 8);
    items = {frame.data + encoded_size, frame.size - encoded_size};
    return true;
  }
};

// ---- start-up --------------------------------------------------------------------

/// The first frame a worker reads: its settings.
struct WorkerConfig {
  std::uint64_t slot = 0;
  std::uint64_t max_tasks = 0;            // maxtasksperchild (0: none)
  std::uint64_t initializer = 0;          // the initializer's handler id (0: none)
  std::uint64_t max_message = 0;          // Options::max_message_bytes
  std::uint64_t max_rss = 0;              // resident bytes over which it leaves (0: no cap)
  std::uint64_t address_space_limit = 0;  // RLIMIT_AS (0: none)
  std::uint64_t shm_threshold = 0;        // larger frames go through shared memory (0: never)
  std::uint64_t remote = 0;               // 1: the pool is on another host (no SharedMemory in results)
  std::int32_t pool_pid = 0;              // the pool's process, whose probe buffer it tries to open
  std::int32_t probe_fd = -1;
  std::uint64_t probe_id = 0;
  std::span<const char> initializer_state;  // the initializer's arguments (cereal)

  static constexpr std::size_t fixed_size = 8 * 8 + 4 + 4 + 8;

  template <class Bytes>
  void encode(Bytes& out) const {
    std::size_t start = begin_frame(out, FrameKind::config);
    for (std::uint64_t v :
         {slot, max_tasks, initializer, max_message, max_rss, address_space_limit, shm_threshold, remote}) {
      put<std::uint64_t>(out, v);
    }
    put<std::int32_t>(out, pool_pid);
    put<std::int32_t>(out, probe_fd);
    put<std::uint64_t>(out, probe_id);
    out.insert(out.end(), initializer_state.begin(), initializer_state.end());
    finish_frame(out, start);
  }
  /// From a config frame; false if it is not one.
  static bool decode(const FrameView& frame, WorkerConfig& config) {
    if (frame.kind != FrameKind::config || frame.size < fixed_size) return false;
    const char* p = frame.data;
    for (std::uint64_t* v : {&config.slot, &config.max_tasks, &config.initializer, &config.max_message, &config.max_rss,
                             &config.address_space_limit, &config.shm_threshold, &config.remote}) {
      *v = get<std::uint64_t>(p);
      p += 8;
    }
    config.pool_pid = get<std::int32_t>(p);
    config.probe_fd = get<std::int32_t>(p + 4);
    config.probe_id = get<std::uint64_t>(p + 8);
    config.initializer_state = {frame.data + fixed_size, frame.size - fixed_size};
    return true;
  }
};

/// A worker's "ready": its initializer ran; what it can do.
struct ReadyMessage {
  std::int32_t pid = 0;
  bool shm = false;     // it can reach the pool's shared memory
  bool claims = false;  // it claims its tasks (claims.hpp)

  static constexpr std::size_t encoded_size = 4 + 4;

  template <class Bytes>
  void encode(Bytes& out) const {
    std::size_t start = begin_frame(out, FrameKind::ready);
    put<std::int32_t>(out, pid);
    put<std::uint32_t>(out, (shm ? 1U : 0U) | (claims ? 2U : 0U));
    finish_frame(out, start);
  }
  static bool decode(const FrameView& frame, ReadyMessage& ready) {
    if (frame.size < encoded_size) return false;
    ready.pid = get<std::int32_t>(frame.data);
    const auto flags = get<std::uint32_t>(frame.data + 4);
    ready.shm = (flags & 1U) != 0;
    ready.claims = (flags & 2U) != 0;
    return true;
  }
};

// ---- shared memory (shm.hpp) -----------------------------------------------------

/// Where bytes are in another process's shared memory: its memfd `fd` in
/// process `pid`, the buffer's `id`, `size` bytes used. Sent as shm_ref (a
/// frame is there, header included) and shm_share (a SharedMemory block).
struct ShmLocation {
  std::int32_t pid = 0;
  std::int32_t fd = -1;
  std::uint64_t id = 0;
  std::uint64_t size = 0;

  static constexpr std::size_t encoded_size = 4 + 4 + 8 + 8;

  template <class Bytes>
  void encode(Bytes& out, FrameKind kind) const {
    std::size_t start = begin_frame(out, kind);
    put<std::int32_t>(out, pid);
    put<std::int32_t>(out, fd);
    put<std::uint64_t>(out, id);
    put<std::uint64_t>(out, size);
    finish_frame(out, start);
  }
  static bool decode(const FrameView& frame, ShmLocation& where) {
    if (frame.size != encoded_size) return false;
    where.pid = get<std::int32_t>(frame.data);
    where.fd = get<std::int32_t>(frame.data + 4);
    where.id = get<std::uint64_t>(frame.data + 8);
    where.size = get<std::uint64_t>(frame.data + 16);
    return true;
  }
};

/// shm_announce: a worker's new result buffer, for the parent to map.
struct ShmAnnounce {
  std::int32_t pid = 0;
  std::int32_t fd = -1;
  std::uint64_t id = 0;

  static constexpr std::size_t encoded_size = 4 + 4 + 8;

  template <class Bytes>
  void encode(Bytes& out) const {
    std::size_t start = begin_frame(out, FrameKind::shm_announce);
    put<std::int32_t>(out, pid);
    put<std::int32_t>(out, fd);
    put<std::uint64_t>(out, id);
    finish_frame(out, start);
  }
  static bool decode(const FrameView& frame, ShmAnnounce& announce) {
    if (frame.size != encoded_size) return false;
    announce.pid = get<std::int32_t>(frame.data);
    announce.fd = get<std::int32_t>(frame.data + 4);
    announce.id = get<std::uint64_t>(frame.data + 8);
    return true;
  }
};

/// shm_drop: a worker unmapped one of its result buffers.
struct ShmDrop {
  std::uint64_t id = 0;

  static constexpr std::size_t encoded_size = 8;

  template <class Bytes>
  void encode(Bytes& out) const {
    std::size_t start = begin_frame(out, FrameKind::shm_drop);
    put<std::uint64_t>(out, id);
    finish_frame(out, start);
  }
  static bool decode(const FrameView& frame, ShmDrop& drop) {
    if (frame.size != encoded_size) return false;
    drop.id = get<std::uint64_t>(frame.data);
    return true;
  }
};

/// A frame with no payload (stop), written into the frame_header_size
/// bytes at `out`.
inline void encode_empty(char* out, FrameKind kind) {
  const std::uint32_t header[2] = {0, static_cast<std::uint32_t>(kind)};
  std::memcpy(out, header, frame_header_size);
}

/// A frame with an empty payload (started, leaving, shm_off).
template <class Bytes>
void encode_empty(Bytes& out, FrameKind kind) {
  finish_frame(out, begin_frame(out, kind));
}

}  // namespace procpool::detail

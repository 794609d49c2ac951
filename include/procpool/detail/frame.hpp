// procpool - the wire format between parent and worker: length-prefixed
// frames over one pipe in each direction.
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
//   result  := u64 task id, u64 run time in ns, per item (cereal): bool ok, value | type, message
//   init_failed / fatal := cereal strings: type, message
//   leaving := (empty)
//   shm_ref := where a frame too large for the pipe is (see shm.hpp)
//   shm_announce, shm_drop := a worker's result buffers coming and going (shm.hpp)
//   shm_off := (empty) the parent cannot map the worker's buffers
#pragma once

#include <cstdint>
#include <cstring>
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
inline constexpr std::size_t result_prefix_size = 8 + 8;
inline constexpr std::size_t shm_share_size = 4 + 4 + 8 + 8;  // i32 pid, i32 fd, u64 id, u64 size

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

}  // namespace procpool::detail

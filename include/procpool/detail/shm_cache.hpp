// procpool - the buffers a process keeps for reuse: the writer's it fills
// (ShmWriter) and the other process's it has mapped (ShmReader).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "protocol.hpp"
#include "shm_map.hpp"
#include "system.hpp"

namespace procpool::detail {

/// The sending side: the buffers this process filled, kept for reuse while
/// few. Not thread-safe.
class ShmWriter {
 public:
  /// `name`: what its memfds are called (shown in /proc/<pid>/maps).
  /// `announce`: a new buffer is announced to the reader and used only once
  /// the reader has mapped it (a worker's results; see the top of this file).
  explicit ShmWriter(const char* name, bool announce = false)
      : name_(name), announce_(announce), buffer_cap_(buffer_cap_for(soft_fd_limit())) {}

  /// Idle buffers are kept for reuse (their pages stay in place, which is
  /// most of the gain) up to this many bytes; beyond it the least recently
  /// used are unmapped.
  static constexpr std::size_t keep_idle_bytes = std::size_t{256} << 20;
  /// An idle buffer not reused in this many acquisitions is unmapped.
  static constexpr std::uint64_t idle_acquisitions = 64;
  /// An idle buffer unused this long is unmapped by trim(), which the pool
  /// and its workers call while they wait: a pool done with large messages
  /// does not keep their memory.
  static constexpr std::chrono::seconds keep_idle_for{2};
  /// Buffers are sized in steps of this many bytes, so one serves messages
  /// of nearly the same size.
  static constexpr std::size_t capacity_step = std::size_t{1} << 20;
  /// Busy buffers (sent, not yet released by their reader) hold at most this
  /// many bytes; a message beyond it goes through the pipe instead, so a
  /// reader that holds many messages unread does not make its writer's
  /// shared memory grow without bound.
  static constexpr std::size_t max_busy_bytes = std::size_t{256} << 20;
  /// Buffers, busy and idle, kept at most: each holds a file descriptor (a
  /// process may have 1024 by default). Beyond it the least recently used
  /// idle one is unmapped to make room; when all are busy, the message goes
  /// through the pipe. Fewer under a lower fd limit: see buffer_cap_for().
  static constexpr std::size_t max_buffers = 128;
  /// At most this share of the fds the process may open go to buffers.
  static constexpr std::size_t fd_share_divisor = 8;

  /// The buffer cap under a soft fd limit (RLIMIT_NOFILE) of `fd_limit`:
  /// max_buffers, or an eighth of the limit if that is less (128 at the
  /// default 1024, 32 at 256), and never under 1.
  static constexpr std::size_t buffer_cap_for(std::size_t fd_limit) {
    return std::clamp<std::size_t>(fd_limit / fd_share_divisor, 1, max_buffers);
  }

  /// Buffers this writer keeps at most: buffer_cap_for() the soft fd limit
  /// when it was made.
  std::size_t buffer_cap() const { return buffer_cap_; }

  /**
   * Copies `frame` (a whole frame, header included) into an idle buffer,
   * marks it busy and returns the reference frame to send in its place; an
   * empty vector if no buffer can take it now (the caller then sends the
   * frame itself). `*used` is set to the buffer. Not for an announcing writer.
   */
  std::vector<char> pass(const char* frame, std::size_t size, ShmBuffer** used = nullptr);

  /**
   * An idle buffer of at least `size` bytes, marked busy; nullptr if none can
   * be had now. An announcing writer may return a new buffer, whose
   * announcement it appends to `control` (with the drops of old buffers):
   * send `control` first, then fill() the buffer, and send its reference
   * only if wait_mapped() says the reader has mapped it (else release() it).
   */
  ShmBuffer* acquire(std::size_t size, std::vector<char>* control);

  /// Copies `frame` (`size` bytes, header included) into `buffer`; returns
  /// the reference frame to send in its place.
  static std::vector<char> fill(ShmBuffer& buffer, const char* frame, std::size_t size);

  /// The frame that refers the reader to the first `size` bytes of `buffer`.
  static std::vector<char> reference(const ShmBuffer& buffer, std::size_t size);

  /// Whether the reader has mapped `buffer`, waiting up to `timeout` for it.
  static bool wait_mapped(const ShmBuffer& buffer, std::chrono::microseconds timeout);

  /// Whether it holds any buffer (the probe aside).
  bool empty() const { return buffers_.empty(); }

  /// The buffer whose data starts at `data`, or nullptr.
  ShmBuffer* find(const char* data) const;

  /// Unmaps the idle buffers last handed out before `before` (an announcing
  /// writer appends their drops to `control`, to send).
  void trim(std::chrono::steady_clock::time_point before, std::vector<char>* control);

  /// Gives back a buffer acquire() returned, unused.
  static void release(ShmBuffer& buffer) { buffer.mapping.release(); }

  /// A buffer kept busy for good: the probe a worker opens to tell whether it
  /// can reach this process's memory. nullptr if there is no shared memory.
  const ShmBuffer* probe();

 private:
  static bool idle(const ShmBuffer& buffer);

  static bool mapped(const ShmBuffer& buffer) { return buffer.mapping.header().is_mapped(); }

  static void announce(const ShmBuffer& buffer, std::vector<char>& control);

  /// Unmaps a buffer (announced ones: and tells the reader).
  /// Returns the buffer after it.
  auto drop(std::vector<std::unique_ptr<ShmBuffer>>::iterator it, std::vector<char>* control) {
    if (announce_ && control != nullptr) {  // an announcing writer always passes `control`
      ShmDrop{(*it)->id}.encode(*control);
    }
    return buffers_.erase(it);
  }

  /// Unmaps every idle buffer for which `unwanted(buffer)` is true.
  template <class Pred>
  void drop_idle_if(Pred unwanted, std::vector<char>* control) {
    for (auto it = buffers_.begin(); it != buffers_.end();) {
      it = idle(**it) && unwanted(**it) ? drop(it, control) : it + 1;
    }
  }

  /// Unmaps the least recently used idle buffer; false if none is idle.
  bool drop_least_recent_idle(std::vector<char>* control);

  /// Unmaps idle buffers unused for long, then the least recently used
  /// while the idle ones hold more than keep_idle_bytes (keeping at least one).
  void prune(std::vector<char>* control);

  /// The soft RLIMIT_NOFILE; unlimited (or unknown) counts as no limit.
  static std::size_t soft_fd_limit();

  const char* name_;
  bool announce_;
  std::size_t buffer_cap_;
  std::vector<std::unique_ptr<ShmBuffer>> buffers_;
  std::unique_ptr<ShmBuffer> probe_;
  std::uint64_t acquisitions_ = 0;
};

/// The receiving side: the other process's buffers, each mapped once and
/// kept. Not thread-safe.
class ShmReader {
 public:
  /// `announced`: only buffers announced (adopt()) are read, mapped writable
  /// (to confirm and release them) and kept until forget(); otherwise a
  /// reference maps the buffer it names on first sight, read-only, and the
  /// least recently used mappings beyond max_cached are let go.
  explicit ShmReader(bool announced = false) : announced_(announced) {}

  struct Resolved {
    std::shared_ptr<ShmMapping> mapping;
    FrameView frame;  // the frame inside the buffer
  };

  /// Resolves a shm_ref frame's payload to the frame it refers to. Throws
  /// std::runtime_error naming what is wrong.
  Resolved resolve(const FrameView& ref, std::size_t max_payload);

  /// A shm_announce frame from process `writer`: maps the buffer and tells
  /// the writer it may use it. False if it cannot be mapped (the writer then
  /// never refers to it).
  bool adopt(const FrameView& announce, pid_t writer);

  /// Whether it holds any mapping.
  bool empty() const { return cache_.empty(); }

  /// Lets go of every mapping: only between frames, as a frame resolve()
  /// returned points into one (unless its caller kept Resolved::mapping).
  /// Not for an announced reader, whose writer decides.
  void clear() { cache_.clear(); }

  /// A shm_drop frame: its writer unmapped the buffer; so does this side
  /// (once no outcome read from it is left).
  void forget(const FrameView& drop);

 private:
  /// Mappings of first-sight buffers kept at most.
  static constexpr std::size_t max_cached = 16;

  struct Entry {
    std::int32_t pid;
    std::int32_t fd;
    std::uint64_t id;
    std::uint64_t last_use;
    std::shared_ptr<ShmMapping> mapping;
  };
  bool announced_;
  std::uint64_t uses_ = 0;
  std::vector<Entry> cache_;
};

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE ShmReader::Resolved ShmReader::resolve(const FrameView& ref, std::size_t max_payload) {
  ShmLocation where;
  if (!ShmLocation::decode(ref, where)) throw std::runtime_error("a shared-memory reference of the wrong size");
  const auto pid = where.pid;
  const auto fd = where.fd;
  const auto id = where.id;
  const auto size = where.size;
  std::shared_ptr<ShmMapping> mapping;
  ++uses_;
  if (announced_) {
    auto it = std::find_if(cache_.begin(), cache_.end(), [&](const Entry& e) { return e.id == id; });
    if (it == cache_.end()) throw std::runtime_error("a reference to a buffer that was not announced");
    mapping = it->mapping;
  } else {
    auto same_fd =
        std::find_if(cache_.begin(), cache_.end(), [&](const Entry& e) { return e.pid == pid && e.fd == fd; });
    if (same_fd != cache_.end() && same_fd->id == id && same_fd->mapping->capacity() >= size) {
      same_fd->last_use = uses_;
      mapping = same_fd->mapping;
    } else {
      // A new buffer (one under the same fd number was closed by its
      // writer), or more of it than was mapped. Only what the frame takes
      // is mapped, for the buffer may be far larger; twice as much as before
      // when mapped again, so frames that keep growing map it a few times.
      std::size_t at_most = size;
      if (same_fd != cache_.end()) {
        if (same_fd->id == id) at_most = std::max(size, 2 * same_fd->mapping->capacity());
        cache_.erase(same_fd);
      }
      mapping = map_foreign_buffer(pid, fd, id, false, at_most);
      if (cache_.size() >= max_cached) {
        // Forget the least recently used (a frame still being read keeps its mapping).
        cache_.erase(std::min_element(cache_.begin(), cache_.end(),
                                      [](const Entry& a, const Entry& b) { return a.last_use < b.last_use; }));
      }
      cache_.push_back({pid, fd, id, uses_, mapping});
    }
  }
  if (size < frame_header_size || size > mapping->capacity()) {
    throw std::runtime_error("a shared-memory reference larger than its buffer");
  }
  const char* data = mapping->data();
  const auto length = get<std::uint32_t>(data);
  if (length != size - frame_header_size) throw std::runtime_error("a shared-memory frame of inconsistent length");
  if (length > max_payload) {
    throw std::runtime_error("a message of " + std::to_string(length) + " bytes, over Options::max_message_bytes (" +
                             std::to_string(max_payload) + ")");
  }
  return {std::move(mapping),
          FrameView{static_cast<FrameKind>(get<std::uint32_t>(data + 4)), data + frame_header_size, length}};
}

PROCPOOL_ENGINE_INLINE bool ShmReader::adopt(const FrameView& announce, pid_t writer) {
  ShmAnnounce message;
  if (!ShmAnnounce::decode(announce, message) || message.pid != writer) return false;
  const auto pid = message.pid;
  const auto fd = message.fd;
  const auto id = message.id;
  try {
    auto mapping = map_foreign_buffer(pid, fd, id, true);
    mapping->header().mark_mapped();
    std::erase_if(cache_, [&](const Entry& e) { return e.id == id; });
    cache_.push_back({pid, fd, id, ++uses_, std::move(mapping)});
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

PROCPOOL_ENGINE_INLINE void ShmReader::forget(const FrameView& drop) {
  ShmDrop message;
  if (!ShmDrop::decode(drop, message)) return;
  const std::uint64_t id = message.id;
  std::erase_if(cache_, [&](const Entry& e) { return e.id == id; });
}

PROCPOOL_ENGINE_INLINE std::vector<char> ShmWriter::pass(const char* frame, std::size_t size, ShmBuffer** used) {
  ShmBuffer* buffer = acquire(size, nullptr);
  if (buffer == nullptr) return {};
  if (used != nullptr) *used = buffer;
  return fill(*buffer, frame, size);
}

PROCPOOL_ENGINE_INLINE ShmBuffer* ShmWriter::acquire(std::size_t size, std::vector<char>* control) {
  ++acquisitions_;
  ShmBuffer* best = nullptr;
  std::size_t busy_bytes = 0;
  bool waiting = false;  // an announced buffer that would do is not mapped yet
  for (auto& buffer : buffers_) {
    if (!idle(*buffer)) {
      busy_bytes += buffer->mapping.capacity();
      continue;
    }
    if (buffer->mapping.capacity() < size) continue;
    if (announce_ && !mapped(*buffer)) {
      waiting = true;
      continue;
    }
    if (best == nullptr || buffer->mapping.capacity() < best->mapping.capacity()) best = buffer.get();
  }
  if ((busy_bytes != 0 && busy_bytes + size > max_busy_bytes) || (best == nullptr && waiting)) {
    // The pipe this time; an announced buffer never mapped ages out like an idle one.
    prune(control);
    return nullptr;
  }
  if (best == nullptr && buffers_.size() >= buffer_cap_ && !drop_least_recent_idle(control)) {
    prune(control);
    return nullptr;  // every buffer busy: the pipe this time
  }
  if (best == nullptr) {
    const std::size_t capacity = (size + capacity_step - 1) / capacity_step * capacity_step;
    try {
      buffers_.push_back(create_shm_buffer(name_, capacity));
    } catch (const std::system_error&) {
      return nullptr;
    }
    best = buffers_.back().get();
    if (announce_) announce(*best, *control);
  }
  best->last_used = acquisitions_;
  best->used_at = std::chrono::steady_clock::now();
  best->mapping.header().busy.store(1, std::memory_order_relaxed);
  prune(control);
  return best;
}

PROCPOOL_ENGINE_INLINE std::vector<char> ShmWriter::fill(ShmBuffer& buffer, const char* frame, std::size_t size) {
  std::memcpy(buffer.mapping.data(), frame, size);
  return reference(buffer, size);
}

PROCPOOL_ENGINE_INLINE std::vector<char> ShmWriter::reference(const ShmBuffer& buffer, std::size_t size) {
  std::vector<char> ref;
  ShmLocation{static_cast<std::int32_t>(::getpid()), buffer.fd.get(), buffer.id, size}.encode(ref, FrameKind::shm_ref);
  return ref;
}

PROCPOOL_ENGINE_INLINE bool ShmWriter::wait_mapped(const ShmBuffer& buffer, std::chrono::microseconds timeout) {
  return buffer.mapping.header().wait_mapped(std::chrono::steady_clock::now() + timeout);
}

PROCPOOL_ENGINE_INLINE ShmBuffer* ShmWriter::find(const char* data) const {
  for (const auto& buffer : buffers_) {
    if (buffer->mapping.data() == data) return buffer.get();
  }
  return nullptr;
}

PROCPOOL_ENGINE_INLINE void ShmWriter::trim(std::chrono::steady_clock::time_point before, std::vector<char>* control) {
  drop_idle_if([&](const ShmBuffer& buffer) { return buffer.used_at < before; }, control);
}

PROCPOOL_ENGINE_INLINE const ShmBuffer* ShmWriter::probe() {
  if (probe_ == nullptr) {
    try {
      probe_ = create_shm_buffer(name_, 4096);
      probe_->mapping.header().busy.store(1, std::memory_order_relaxed);
    } catch (const std::system_error&) {
      return nullptr;
    }
  }
  return probe_.get();
}

PROCPOOL_ENGINE_INLINE bool ShmWriter::idle(const ShmBuffer& buffer) {
  return buffer.mapping.header().busy.load(std::memory_order_acquire) == 0;
}

PROCPOOL_ENGINE_INLINE void ShmWriter::announce(const ShmBuffer& buffer, std::vector<char>& control) {
  ShmAnnounce{static_cast<std::int32_t>(::getpid()), buffer.fd.get(), buffer.id}.encode(control);
}

PROCPOOL_ENGINE_INLINE bool ShmWriter::drop_least_recent_idle(std::vector<char>* control) {
  auto oldest = buffers_.end();
  for (auto it = buffers_.begin(); it != buffers_.end(); ++it) {
    if (idle(**it) && (oldest == buffers_.end() || (*it)->last_used < (*oldest)->last_used)) oldest = it;
  }
  if (oldest == buffers_.end()) return false;
  drop(oldest, control);
  return true;
}

PROCPOOL_ENGINE_INLINE void ShmWriter::prune(std::vector<char>* control) {
  drop_idle_if([&](const ShmBuffer& buffer) { return acquisitions_ - buffer.last_used > idle_acquisitions; }, control);
  for (;;) {
    std::size_t idle_bytes = 0, idle_count = 0;
    for (const auto& buffer : buffers_) {
      if (!idle(*buffer)) continue;
      idle_bytes += buffer->mapping.capacity();
      ++idle_count;
    }
    if (idle_bytes <= keep_idle_bytes || idle_count <= 1) return;
    drop_least_recent_idle(control);
  }
}

PROCPOOL_ENGINE_INLINE std::size_t ShmWriter::soft_fd_limit() {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return SIZE_MAX;
  return static_cast<std::size_t>(limit.rlim_cur);
}

}  // namespace procpool::detail
#endif

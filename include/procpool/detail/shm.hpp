// procpool - large frames through shared memory instead of the pipe.
//
// A frame larger than Options::shared_memory_threshold is put in a memfd
// its sender keeps mapped for reuse (a task frame is encoded straight into
// one: TaskMemory, at the end of this file); only a reference to it goes
// through the pipe. The receiver opens the sender's memfd through
// /proc/<pid>/fd/<fd> (no fd needs to travel, so every start method works
// unchanged), maps it once, keeps the mapping, and reads the frame in place.
//
//   buffer       := header (shm_header_size bytes), the frame as it would
//                   have gone through the pipe (frame header included)
//   shm_ref      := i32 pid, i32 fd, u64 buffer id, u64 frame size
//   shm_announce := i32 pid, i32 fd, u64 buffer id   (worker -> parent)
//   shm_drop     := u64 buffer id                    (worker -> parent)
//
// Tasks (parent -> worker): a buffer holding a frame encoded into it is busy
// from the encoding until the task is settled (one a frame on the heap was
// copied into: from the copy). The worker opens a buffer of the parent's when
// a reference first names it. The parent outlives its workers, so the buffer is
// always there to open.
//
// Results (worker -> parent): a worker can die or exit right after sending,
// and a dead process's /proc/<pid>/fd is empty, so the parent must have a
// buffer mapped before the worker sends a reference to it. A worker announces
// each new buffer, fills it, and waits (briefly) for the parent to map it and
// set `mapped` in its header before it sends the reference; if the parent
// has not, the result goes through the pipe. The parent keeps the mapping
// until the worker says it dropped the buffer (shm_drop) or the worker is
// gone. A buffer the parent cannot map is never referred to.
//
// A buffer is busy from the moment its writer fills it until the reader
// releases it: a worker's result buffers are released by the parent once it
// has decoded them (it clears `busy` in the shared header); the parent's task
// buffers are released by the parent itself once the task is settled (a task
// whose worker died may be sent again, from the same buffer). A writer reuses
// only buffers that are not busy.
#pragma once

#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "protocol.hpp"
#include "system.hpp"

namespace procpool::detail {

inline constexpr std::uint64_t shm_magic = 0x6c6f6f70636f7270ULL;  // "procpool"
inline constexpr std::size_t shm_header_size = 64;

struct ShmHeader {
  std::uint64_t magic;
  std::uint64_t id;
  std::uint64_t capacity;             // bytes after the header
  std::atomic<std::uint32_t> busy;    // 1 from the writer's fill to the reader's release
  std::atomic<std::uint32_t> mapped;  // 1 once the reader holds a mapping (announced buffers, shared blocks)

  // The reader's mark that it has the memory mapped, and the writer's wait
  // for it. A futex on shared memory: the word is the same in every process
  // mapping it.
  void expect_reader() { mapped.store(0, std::memory_order_relaxed); }
  bool is_mapped() const { return mapped.load(std::memory_order_acquire) != 0; }
  void mark_mapped() {
    mapped.store(1, std::memory_order_release);
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&mapped), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
  }
  /// Waits until the reader has marked it mapped, or `until`.
  bool wait_mapped(std::chrono::steady_clock::time_point until) {
    while (!is_mapped()) {
      const auto left = until - std::chrono::steady_clock::now();
      if (left <= std::chrono::steady_clock::duration::zero()) return false;
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
      timespec timeout{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
      ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&mapped), FUTEX_WAIT, 0, &timeout, nullptr, 0);
    }
    return true;
  }
};
static_assert(sizeof(ShmHeader) <= shm_header_size);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free, "busy is shared between processes");

/// A shared mapping of a whole memfd, unmapped on destruction. It takes a
/// mapping already marked MADV_DONTFORK where it was made, under the fd
/// registry's lock (create_mapped_memfd, open_foreign_memory): a worker
/// forked later must not carry it.
class ShmMapping {
 public:
  ShmMapping(void* base, std::size_t size) : base_(static_cast<char*>(base)), size_(size) {}
  ShmMapping(const ShmMapping&) = delete;
  ShmMapping& operator=(const ShmMapping&) = delete;
  ~ShmMapping() { ::munmap(base_, size_); }

  ShmHeader& header() const { return *reinterpret_cast<ShmHeader*>(base_); }
  /// Its reader is done with it: its writer may fill it again.
  void release() const { header().busy.store(0, std::memory_order_release); }
  char* data() const { return base_ + shm_header_size; }
  std::size_t capacity() const { return size_ - shm_header_size; }

 private:
  char* base_;
  std::size_t size_;
};

/// Part of another process's buffer this process is reading; releases the
/// buffer (clears its busy flag) on destruction.
class ShmSlice {
 public:
  ShmSlice(std::shared_ptr<ShmMapping> mapping, const char* data, std::size_t size)
      : mapping_(std::move(mapping)), data_(data), size_(size) {}
  ShmSlice(const ShmSlice&) = delete;
  ShmSlice& operator=(const ShmSlice&) = delete;
  ~ShmSlice() { mapping_->release(); }

  const char* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  std::shared_ptr<ShmMapping> mapping_;
  const char* data_;
  std::size_t size_;
};

/// A buffer this process writes into.
struct ShmBuffer {
  Fd fd;
  ShmMapping mapping;
  std::uint64_t id;
  std::uint64_t last_used = 0;                      // the writer's acquisition count when last handed out
  std::chrono::steady_clock::time_point used_at{};  // when last handed out, or given back through a ShmLease
};

/// Marks a buffer of the writer's own free again when it goes (the parent's
/// task buffers: the reader never writes into them). `mutex`: the writer's
/// lock, where other threads use the writer too (TaskMemory).
class ShmLease {
 public:
  ShmLease() = default;
  explicit ShmLease(ShmBuffer* buffer, std::mutex* mutex = nullptr) : buffer_(buffer), mutex_(mutex) {}
  ShmLease(ShmLease&& other) noexcept
      : buffer_(std::exchange(other.buffer_, nullptr)), mutex_(std::exchange(other.mutex_, nullptr)) {}
  ShmLease& operator=(ShmLease&& other) noexcept {
    if (this != &other) {
      reset();
      buffer_ = std::exchange(other.buffer_, nullptr);
      mutex_ = std::exchange(other.mutex_, nullptr);
    }
    return *this;
  }
  ~ShmLease() { reset(); }
  void reset() noexcept {
    if (buffer_ == nullptr) return;
    std::unique_lock<std::mutex> lock;
    if (mutex_ != nullptr) lock = std::unique_lock(*mutex_);
    give_back(*std::exchange(buffer_, nullptr));
  }
  /// Marks `buffer` idle from now (trim() counts from here).
  static void give_back(ShmBuffer& buffer) noexcept {
    buffer.used_at = std::chrono::steady_clock::now();
    buffer.mapping.release();
  }

 private:
  ShmBuffer* buffer_ = nullptr;
  std::mutex* mutex_ = nullptr;
};

/// Ids of buffers: unique within a process (readers key them by pid too).
inline std::uint64_t next_shm_id() {
  static std::atomic<std::uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

/// A new memfd of `size` bytes named `name`, mapped whole, shared and not
/// inherited by a fork; throws std::system_error where memfd_create,
/// ftruncate or mmap fail.
/// `sealed`: its size can never change (no other process holding it can
/// shrink it under this one's mapping).
inline std::pair<Fd, void*> create_mapped_memfd(const char* name, std::size_t size, bool sealed = false) {
  Fd fd = make_tracked("memfd_create",
                       [&] { return ::memfd_create(name, MFD_CLOEXEC | (sealed ? MFD_ALLOW_SEALING : 0U)); });
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) throw_errno("ftruncate(memfd)");
  if (sealed && ::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) throw_errno("fcntl(F_ADD_SEALS)");
  void* base;
  {
    // Buffers are made on the threads that encode tasks: a fork() (which
    // holds this lock) between mmap and MADV_DONTFORK would give its worker
    // the mapping.
    std::lock_guard lock(FdRegistry::instance().mutex());
    base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    if (base != MAP_FAILED) ::madvise(base, size, MADV_DONTFORK);
  }
  if (base == MAP_FAILED) throw_errno("mmap(memfd)");
  return {std::move(fd), base};
}

/// Creates a memfd of `capacity` bytes after the header, mapped; throws
/// std::system_error where memfd_create or mmap fail.
inline std::unique_ptr<ShmBuffer> create_shm_buffer(const char* name, std::size_t capacity) {
  const std::size_t size = shm_header_size + capacity;
  auto [fd, base] = create_mapped_memfd(name, size);
  const std::uint64_t id = next_shm_id();
  auto buffer = std::unique_ptr<ShmBuffer>(new ShmBuffer{std::move(fd), ShmMapping(base, size), id});
  ShmHeader& header = buffer->mapping.header();
  header.magic = shm_magic;
  header.id = id;
  header.capacity = capacity;
  header.busy.store(0, std::memory_order_relaxed);
  header.expect_reader();
  return buffer;
}

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
  std::vector<char> pass(const char* frame, std::size_t size, ShmBuffer** used = nullptr) {
    ShmBuffer* buffer = acquire(size, nullptr);
    if (buffer == nullptr) return {};
    if (used != nullptr) *used = buffer;
    return fill(*buffer, frame, size);
  }

  /**
   * An idle buffer of at least `size` bytes, marked busy; nullptr if none can
   * be had now. An announcing writer may return a new buffer, whose
   * announcement it appends to `control` (with the drops of old buffers):
   * send `control` first, then fill() the buffer, and send its reference
   * only if wait_mapped() says the reader has mapped it (else release() it).
   */
  ShmBuffer* acquire(std::size_t size, std::vector<char>* control) {
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

  /// Copies `frame` (`size` bytes, header included) into `buffer`; returns
  /// the reference frame to send in its place.
  static std::vector<char> fill(ShmBuffer& buffer, const char* frame, std::size_t size) {
    std::memcpy(buffer.mapping.data(), frame, size);
    return reference(buffer, size);
  }

  /// The frame that refers the reader to the first `size` bytes of `buffer`.
  static std::vector<char> reference(const ShmBuffer& buffer, std::size_t size) {
    std::vector<char> ref;
    ShmLocation{static_cast<std::int32_t>(::getpid()), buffer.fd.get(), buffer.id, size}.encode(ref,
                                                                                                FrameKind::shm_ref);
    return ref;
  }

  /// Whether the reader has mapped `buffer`, waiting up to `timeout` for it.
  static bool wait_mapped(const ShmBuffer& buffer, std::chrono::microseconds timeout) {
    return buffer.mapping.header().wait_mapped(std::chrono::steady_clock::now() + timeout);
  }

  /// Whether it holds any buffer (the probe aside).
  bool empty() const { return buffers_.empty(); }

  /// The buffer whose data starts at `data`, or nullptr.
  ShmBuffer* find(const char* data) const {
    for (const auto& buffer : buffers_) {
      if (buffer->mapping.data() == data) return buffer.get();
    }
    return nullptr;
  }

  /// Unmaps the idle buffers last handed out before `before` (an announcing
  /// writer appends their drops to `control`, to send).
  void trim(std::chrono::steady_clock::time_point before, std::vector<char>* control) {
    drop_idle_if([&](const ShmBuffer& buffer) { return buffer.used_at < before; }, control);
  }

  /// Gives back a buffer acquire() returned, unused.
  static void release(ShmBuffer& buffer) { buffer.mapping.release(); }

  /// A buffer kept busy for good: the probe a worker opens to tell whether it
  /// can reach this process's memory. nullptr if there is no shared memory.
  const ShmBuffer* probe() {
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

 private:
  static bool idle(const ShmBuffer& buffer) {
    return buffer.mapping.header().busy.load(std::memory_order_acquire) == 0;
  }

  static bool mapped(const ShmBuffer& buffer) { return buffer.mapping.header().is_mapped(); }

  static void announce(const ShmBuffer& buffer, std::vector<char>& control) {
    ShmAnnounce{static_cast<std::int32_t>(::getpid()), buffer.fd.get(), buffer.id}.encode(control);
  }

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
  bool drop_least_recent_idle(std::vector<char>* control) {
    auto oldest = buffers_.end();
    for (auto it = buffers_.begin(); it != buffers_.end(); ++it) {
      if (idle(**it) && (oldest == buffers_.end() || (*it)->last_used < (*oldest)->last_used)) oldest = it;
    }
    if (oldest == buffers_.end()) return false;
    drop(oldest, control);
    return true;
  }

  /// Unmaps idle buffers unused for long, then the least recently used
  /// while the idle ones hold more than keep_idle_bytes (keeping at least one).
  void prune(std::vector<char>* control) {
    drop_idle_if([&](const ShmBuffer& buffer) { return acquisitions_ - buffer.last_used > idle_acquisitions; },
                 control);
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

  /// The soft RLIMIT_NOFILE; unlimited (or unknown) counts as no limit.
  static std::size_t soft_fd_limit() {
    rlimit limit{};
    if (::getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return SIZE_MAX;
    return static_cast<std::size_t>(limit.rlim_cur);
  }

  const char* name_;
  bool announce_;
  std::size_t buffer_cap_;
  std::vector<std::unique_ptr<ShmBuffer>> buffers_;
  std::unique_ptr<ShmBuffer> probe_;
  std::uint64_t acquisitions_ = 0;
};

/// Another process's memfd, opened through /proc/<pid>/fd/<fd> and mapped whole.
struct ForeignMemory {
  Fd fd;  // tracked: a worker forked later closes it
  std::unique_ptr<ShmMapping> mapping;
};

/// Opens another process's memfd named `prefix`..., checks that it is the
/// buffer `id` names, maps it whole. Throws std::runtime_error naming what
/// failed.
inline ForeignMemory open_foreign_memory(std::int32_t pid, std::int32_t fd, std::uint64_t id, bool writable,
                                         std::string_view prefix = "/memfd:procpool-") {
  const std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
  // Only a procpool memfd is opened: whatever else that fd may be by now (a
  // terminal, a FIFO) could block the open or become a controlling terminal.
  char target[64] = {};
  const ssize_t length = ::readlink(path.c_str(), target, sizeof(target) - 1);
  if (length < 0) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
  if (std::string_view(target, static_cast<std::size_t>(length)).rfind(prefix, 0) != 0) {
    throw std::runtime_error(path + " is not the procpool buffer the message names");
  }
  Fd file = make_tracked("open", [&] {
    return ::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  });
  struct stat st {};
  if (::fstat(file.get(), &st) != 0 || static_cast<std::size_t>(st.st_size) < shm_header_size) {
    throw std::runtime_error(path + " is not a procpool buffer");
  }
  const auto size = static_cast<std::size_t>(st.st_size);
  void* base;
  {
    // As in create_shm_buffer: no fork() between mmap and MADV_DONTFORK.
    std::lock_guard lock(FdRegistry::instance().mutex());
    base = ::mmap(nullptr, size, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, file.get(), 0);
    if (base != MAP_FAILED) ::madvise(base, size, MADV_DONTFORK);
  }
  if (base == MAP_FAILED) throw std::runtime_error("cannot map " + path + ": " + std::strerror(errno));
  auto mapping = std::make_unique<ShmMapping>(base, size);
  const ShmHeader& header = mapping->header();
  if (header.magic != shm_magic || header.id != id || header.capacity != size - shm_header_size) {
    throw std::runtime_error(path + " is not the procpool buffer the message names");
  }
  return {std::move(file), std::move(mapping)};
}

/// Maps another process's buffer (see open_foreign_memory); its fd is not kept.
inline std::shared_ptr<ShmMapping> map_foreign_buffer(std::int32_t pid, std::int32_t fd, std::uint64_t id,
                                                      bool writable) {
  return std::shared_ptr<ShmMapping>(open_foreign_memory(pid, fd, id, writable).mapping.release());
}

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
  Resolved resolve(const FrameView& ref, std::size_t max_payload) {
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
      if (same_fd != cache_.end() && same_fd->id == id) {
        same_fd->last_use = uses_;
        mapping = same_fd->mapping;
      } else {
        // A new buffer; one under the same fd number was closed by its writer.
        if (same_fd != cache_.end()) cache_.erase(same_fd);
        mapping = map_foreign_buffer(pid, fd, id, false);
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

  /// A shm_announce frame from process `writer`: maps the buffer and tells
  /// the writer it may use it. False if it cannot be mapped (the writer then
  /// never refers to it).
  bool adopt(const FrameView& announce, pid_t writer) {
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

  /// Whether it holds any mapping.
  bool empty() const { return cache_.empty(); }

  /// Lets go of every mapping: only between frames, as a frame resolve()
  /// returned points into one (unless its caller kept Resolved::mapping).
  /// Not for an announced reader, whose writer decides.
  void clear() { cache_.clear(); }

  /// A shm_drop frame: its writer unmapped the buffer; so does this side
  /// (once no outcome read from it is left).
  void forget(const FrameView& drop) {
    ShmDrop message;
    if (!ShmDrop::decode(drop, message)) return;
    const std::uint64_t id = message.id;
    std::erase_if(cache_, [&](const Entry& e) { return e.id == id; });
  }

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

/// In a worker: whether it can open the pool's probe buffer, i.e. whether
/// shared memory works between the two (same user, /proc mounted, memfd).
inline bool can_reach_shm(std::int32_t pid, std::int32_t fd, std::uint64_t id) {
  if (pid <= 0 || fd < 0) return false;
  try {
    map_foreign_buffer(pid, fd, id, false);
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

/// The pool's buffers for task frames, shared by the threads that encode
/// tasks and the pool's I/O thread. A task frame grows into one of them as
/// soon as it passes the threshold (TaskAllocator), so a large argument is
/// encoded once, straight where the worker reads it, instead of into the
/// heap and then copied over. Thread-safe.
class TaskMemory {
 public:
  /// `threshold`: frames larger than this many bytes go into shared memory
  /// (0: none); none either where no memfd can be had.
  explicit TaskMemory(std::size_t threshold) : threshold_(threshold) {
    if (threshold_ != 0 && writer_.probe() == nullptr) threshold_ = 0;
  }

  /// Frames larger than this go into shared memory; 0: none do.
  std::size_t threshold() const { return threshold_; }
  /// Whether a frame storage of `size` bytes may be in shared memory.
  bool may_place(std::size_t size) const { return threshold_ != 0 && size > threshold_; }

  /// The buffer a worker opens to tell whether it can reach this memory.
  const ShmBuffer* probe() {
    std::lock_guard lock(mutex_);
    return threshold_ != 0 ? writer_.probe() : nullptr;
  }

  /// Storage for `size` bytes of a frame, at the start of an idle buffer now
  /// marked busy; nullptr where it stays on the heap (small, shared memory
  /// off, or the busy buffers already hold ShmWriter::max_busy_bytes or
  /// number ShmWriter::buffer_cap()).
  char* allocate(std::size_t size) {
    if (!may_place(size)) return nullptr;
    std::lock_guard lock(mutex_);
    ShmBuffer* buffer = writer_.acquire(size, nullptr);
    return buffer != nullptr ? buffer->mapping.data() : nullptr;
  }
  /// Gives back storage allocate() returned; false if `data` is not from here.
  bool deallocate(const char* data) noexcept {
    std::lock_guard lock(mutex_);
    ShmBuffer* buffer = writer_.find(data);
    if (buffer == nullptr) return false;
    ShmLease::give_back(*buffer);
    return true;
  }

  /// The reference frame that points a worker at a frame allocate() placed,
  /// `size` bytes from its start; empty if `frame` is not in shared memory.
  std::vector<char> reference(const char* frame, std::size_t size) {
    std::lock_guard lock(mutex_);
    const ShmBuffer* buffer = writer_.find(frame);
    return buffer != nullptr ? ShmWriter::reference(*buffer, size) : std::vector<char>{};
  }

  /// Copies a frame on the heap into an idle buffer (see ShmWriter::pass);
  /// `lease` keeps the buffer busy until the worker is done with it. An
  /// empty vector if none can take it now.
  std::vector<char> pass(const char* frame, std::size_t size, ShmLease& lease) {
    ShmBuffer* used = nullptr;
    std::vector<char> ref;
    {
      std::lock_guard lock(mutex_);
      ref = writer_.pass(frame, size, &used);
    }
    if (!ref.empty()) lease = ShmLease(used, &mutex_);  // outside the lock: it gives back what `lease` held
    return ref;
  }

  /// Whether it holds any buffer (the probe aside).
  bool empty() {
    std::lock_guard lock(mutex_);
    return writer_.empty();
  }
  /// Unmaps the buffers idle since before `before`.
  void trim(std::chrono::steady_clock::time_point before) {
    std::lock_guard lock(mutex_);
    writer_.trim(before, nullptr);
  }

 private:
  std::mutex mutex_;
  ShmWriter writer_{"procpool-task"};
  std::size_t threshold_;
};

/// Allocates the storage of task frames: past the pool's threshold, in its
/// shared memory (TaskMemory); otherwise, or without a TaskMemory, on the heap.
template <class T>
class TaskAllocator {
  static_assert(sizeof(T) == 1, "task frames are bytes");

 public:
  using value_type = T;
  using propagate_on_container_move_assignment = std::true_type;
  using propagate_on_container_swap = std::true_type;

  TaskAllocator() = default;
  explicit TaskAllocator(std::shared_ptr<TaskMemory> memory) : memory_(std::move(memory)) {}
  // No move constructor: a moved-from allocator keeps its memory, as allocators must.
  TaskAllocator(const TaskAllocator&) = default;
  TaskAllocator& operator=(const TaskAllocator&) = default;
  template <class U>
  TaskAllocator(const TaskAllocator<U>& other) : memory_(other.memory()) {}  // NOLINT: rebinding converts implicitly

  T* allocate(std::size_t n) {
    if (memory_ != nullptr) {
      if (char* placed = memory_->allocate(n)) return reinterpret_cast<T*>(placed);
    }
    return std::allocator<T>().allocate(n);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    // Only storage larger than the threshold may have been placed.
    if (memory_ != nullptr && memory_->may_place(n) && memory_->deallocate(reinterpret_cast<const char*>(p))) return;
    std::allocator<T>().deallocate(p, n);
  }

  /// Bytes made by resize() are left as they are (the encoder writes them
  /// next), not zeroed one by one.
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... A>
  void construct(U* p, A&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(args)...);
  }

  const std::shared_ptr<TaskMemory>& memory() const { return memory_; }
  template <class U>
  bool operator==(const TaskAllocator<U>& other) const {
    return memory_ == other.memory();
  }

 private:
  std::shared_ptr<TaskMemory> memory_;
};

/// A task frame being encoded: a vector of bytes whose storage moves into the
/// pool's shared memory once it is large (see TaskMemory).
using TaskBytes = std::vector<char, TaskAllocator<char>>;

// ---- procpool::SharedMemory's memory ----------------------------------------
// A block of memory processes share: a memfd of its own (header as above,
// then the bytes), mapped whole and read and written in place by every
// process holding it. It travels as a reference (pid, fd, id); the receiver
// opens the sender's fd through /proc, or, when it already holds the block
// (it is the same id), uses its own mapping.
//
// Lifetimes: a block the parent sends is held by its task until the task is
// settled (Chunk::shares). A block a worker sends it announces first
// (shm_share); the parent maps it at once, sets its header's `mapped`, and
// keeps it with the result until that is decoded; the worker sends the
// result only once `mapped` is set (or holds the block until it is), as it
// may die or exit right after.

/// The memory behind a procpool::SharedMemory in one process.
struct SharedState {
  SharedState(Fd file, std::unique_ptr<ShmMapping> map)
      : fd(std::move(file)), mapping(std::move(map)), id_(mapping->header().id), owner_(::getpid()) {}
  SharedState(const SharedState&) = delete;
  SharedState& operator=(const SharedState&) = delete;
  ~SharedState();

  /// Read once: the header is writable by every process holding the block.
  std::uint64_t id() const { return id_; }
  std::size_t size() const { return mapping->capacity(); }
  char* data() const { return mapping->data(); }
  /// Copied into a fork() of the process that mapped it: not mapped here
  /// (MADV_DONTFORK), its fd closed.
  bool inherited() const { return owner_ != ::getpid(); }
  pid_t owner() const { return owner_; }

  /// The reader's mark on its header (see ShmHeader): cleared before it is
  /// announced, set (with a wake-up) once the reader has it mapped.
  ShmHeader& header() const { return mapping->header(); }

  Fd fd;  // kept open: it is how another process opens the block
  std::unique_ptr<ShmMapping> mapping;

 private:
  std::uint64_t id_;
  pid_t owner_;
};

/// Blocks a message refers to, kept alive with it.
using SharedStates = std::vector<std::shared_ptr<SharedState>>;

/// The blocks this process holds, by id, so one that comes back (a worker
/// returns the block it was given) is the same mapping, not a second one.
/// Under the fd registry's lock, which fork() holds: a forked worker never
/// copies it locked, and drops its copy (pid_) of what its parent held.
class SharedRegistry {
 public:
  static std::shared_ptr<SharedState> find(std::uint64_t id) {
    auto& self = instance();
    std::lock_guard lock(FdRegistry::instance().mutex());
    self.own();
    auto it = self.blocks_.find(id);
    return it != self.blocks_.end() ? it->second.weak.lock() : nullptr;
  }
  /// Registers `state`, or returns the block already registered under its id.
  static std::shared_ptr<SharedState> add(const std::shared_ptr<SharedState>& state) {
    auto& self = instance();
    std::lock_guard lock(FdRegistry::instance().mutex());
    self.own();
    auto& slot = self.blocks_[state->id()];
    if (auto held = slot.weak.lock()) return held;  // returned, so not destroyed under the lock
    slot = {state, state.get()};
    return state;
  }
  static void remove(const SharedState* state) noexcept {
    auto& self = instance();
    std::lock_guard lock(FdRegistry::instance().mutex());
    if (self.pid_ != ::getpid()) return;
    auto it = self.blocks_.find(state->id());
    if (it != self.blocks_.end() && it->second.raw == state) self.blocks_.erase(it);
  }

 private:
  struct Entry {
    std::weak_ptr<SharedState> weak;
    const SharedState* raw = nullptr;  // compared, never followed
  };
  static SharedRegistry& instance() {
    // Never destroyed: a block may outlive static destruction.
    static auto* registry = new SharedRegistry;
    return *registry;
  }
  /// In a forked child: the parent's blocks are not mapped here (MADV_DONTFORK).
  void own() {
    if (pid_ == ::getpid()) return;
    blocks_.clear();  // weak references only: nothing is unmapped
    pid_ = ::getpid();
  }
  pid_t pid_ = ::getpid();
  std::unordered_map<std::uint64_t, Entry> blocks_;
};

inline SharedState::~SharedState() {
  if (inherited()) {
    // Neither the mapping nor the fd number is this process's: unmapping or
    // closing them could hit what this process has put there since.
    static_cast<void>(fd.release());
    static_cast<void>(mapping.release());
    return;
  }
  SharedRegistry::remove(this);
}

/// A new zero-filled block of `size` bytes; throws std::system_error where
/// memfd_create, ftruncate or mmap fail.
inline std::shared_ptr<SharedState> create_shared_state(std::size_t size) {
  const std::size_t total = shm_header_size + size;
  auto [fd, base] = create_mapped_memfd("procpool-shared", total, true);
  auto mapping = std::make_unique<ShmMapping>(base, total);
  // Ids are random, not counted: a block's id must not be reused by a later
  // worker that happens to get the same pid.
  std::uint64_t id = 0;
  while (id == 0) {
    if (::getrandom(&id, sizeof(id), GRND_NONBLOCK) != static_cast<ssize_t>(sizeof(id))) {
      id = (static_cast<std::uint64_t>(::getpid()) << 40) ^ next_shm_id() ^
           static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    }
  }
  ShmHeader& header = mapping->header();
  header.magic = shm_magic;
  header.id = id;
  header.capacity = size;
  auto state = std::make_shared<SharedState>(std::move(fd), std::move(mapping));
  return SharedRegistry::add(state);
}

/// The block `id` of `size` bytes that process `pid` holds as fd `fd`: this
/// process's own mapping if it holds it already, else the other process's
/// opened and mapped. Throws std::runtime_error naming what failed.
inline std::shared_ptr<SharedState> open_shared_state(std::int32_t pid, std::int32_t fd, std::uint64_t id,
                                                      std::uint64_t size) {
  auto state = SharedRegistry::find(id);
  if (!state) {
    try {
      ForeignMemory memory = open_foreign_memory(pid, fd, id, true, "/memfd:procpool-shared");
      state = SharedRegistry::add(std::make_shared<SharedState>(std::move(memory.fd), std::move(memory.mapping)));
    } catch (const std::exception& e) {
      throw std::runtime_error("procpool::SharedMemory: cannot map the block of " + std::to_string(size) +
                               " bytes that process " + std::to_string(pid) + " sent: " + e.what());
    }
  }
  if (state->size() != size) {
    throw std::runtime_error("procpool::SharedMemory: a reference to " + std::to_string(size) +
                             " bytes of a block of " + std::to_string(state->size()));
  }
  return state;
}

}  // namespace procpool::detail

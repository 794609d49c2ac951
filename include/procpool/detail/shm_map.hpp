// procpool - shared memory's primitives: memfd buffers, their shared header
// (the busy and mapped flags), mappings, and opening another process's
// buffer through /proc. The design of large frames through shared memory
// is below; shm_cache.hpp keeps buffers for reuse, task_memory.hpp holds
// task frames, shared_state.hpp backs procpool::SharedMemory.
//
//
// A frame larger than Options::shared_memory_threshold is put in a memfd
// its sender keeps mapped for reuse (a task frame is encoded straight into
// one: TaskMemory, task_memory.hpp); only a reference to it goes
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

#include "config.hpp"
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
  ~ShmMapping() {
    if (here()) ::munmap(base_, size_);
  }

  /// Whether this process made it. A child made by fork() has a copy of
  /// this object but not the mapping, and its address may hold another.
  /// Asked of the kernel, not current_pid(): unmapping in a child made
  /// without atfork handlers (_Fork()) could unmap another mapping there.
  bool here() const noexcept { return ::getpid() == owner_; }
  ShmHeader& header() const { return *reinterpret_cast<ShmHeader*>(base_); }
  /// Its reader is done with it: its writer may fill it again.
  void release() const {
    if (here()) header().busy.store(0, std::memory_order_release);
  }
  char* data() const { return base_ + shm_header_size; }
  std::size_t capacity() const { return size_ - shm_header_size; }

 private:
  char* base_;
  std::size_t size_;
  pid_t owner_ = ::getpid();
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
    if (!buffer_->mapping.here()) {  // a copy made by fork(): the buffer is the parent's
      buffer_ = nullptr;
      return;
    }
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

/// Another process's memfd, opened through /proc/<pid>/fd/<fd> and mapped whole.
struct ForeignMemory {
  Fd fd;  // tracked: a worker forked later closes it
  std::unique_ptr<ShmMapping> mapping;
};

/// What the names of procpool's memfds start with, as /proc shows them.
inline constexpr std::string_view memfd_prefix = "/memfd:procpool-";

/// Opens another process's memfd named `prefix`..., checks that it is the
/// buffer `id` names, and maps it: whole, or only as many pages as its
/// first `at_most` bytes of data take (a worker under an address-space limit
/// reads a small frame from a large buffer). Throws std::runtime_error
/// naming what failed.
PROCPOOL_ENGINE_INLINE ForeignMemory open_foreign_memory(std::int32_t pid, std::int32_t fd, std::uint64_t id,
                                                         bool writable, std::string_view prefix = memfd_prefix,
                                                         std::size_t at_most = SIZE_MAX);

/// Maps another process's buffer, or its first `at_most` bytes of data (see
/// open_foreign_memory); its fd is not kept.
inline std::shared_ptr<ShmMapping> map_foreign_buffer(std::int32_t pid, std::int32_t fd, std::uint64_t id,
                                                      bool writable, std::size_t at_most = SIZE_MAX) {
  return std::shared_ptr<ShmMapping>(
      open_foreign_memory(pid, fd, id, writable, memfd_prefix, at_most).mapping.release());
}

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

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE ForeignMemory open_foreign_memory(std::int32_t pid, std::int32_t fd, std::uint64_t id,
                                                         bool writable, std::string_view prefix, std::size_t at_most) {
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
  std::size_t mapped = size;
  if (at_most < size - shm_header_size) {
    const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    mapped = std::min(size, (shm_header_size + at_most + page - 1) / page * page);
  }
  void* base;
  {
    // As in create_shm_buffer: no fork() between mmap and MADV_DONTFORK.
    std::lock_guard lock(FdRegistry::instance().mutex());
    base = ::mmap(nullptr, mapped, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, file.get(), 0);
    if (base != MAP_FAILED) ::madvise(base, mapped, MADV_DONTFORK);
  }
  if (base == MAP_FAILED) throw std::runtime_error("cannot map " + path + ": " + std::strerror(errno));
  auto mapping = std::make_unique<ShmMapping>(base, mapped);
  const ShmHeader& header = mapping->header();
  if (header.magic != shm_magic || header.id != id || header.capacity != size - shm_header_size) {
    throw std::runtime_error(path + " is not the procpool buffer the message names");
  }
  return {std::move(file), std::move(mapping)};
}

}  // namespace procpool::detail
#endif

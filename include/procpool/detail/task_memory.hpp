// procpool - the pool's memory for task frames: a frame past the threshold
// is encoded straight into a shared buffer the worker reads in place.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "config.hpp"
#include "shm_cache.hpp"
#include "shm_map.hpp"

namespace procpool::detail {

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
  char* allocate(std::size_t size);
  /// Gives back storage allocate() returned; false if `data` is not from here.
  bool deallocate(const char* data) noexcept;

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

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE char* TaskMemory::allocate(std::size_t size) {
  if (!may_place(size)) return nullptr;
  std::lock_guard lock(mutex_);
  ShmBuffer* buffer = writer_.acquire(size, nullptr);
  return buffer != nullptr ? buffer->mapping.data() : nullptr;
}

PROCPOOL_ENGINE_INLINE bool TaskMemory::deallocate(const char* data) noexcept {
  std::lock_guard lock(mutex_);
  ShmBuffer* buffer = writer_.find(data);
  if (buffer == nullptr) return false;
  ShmLease::give_back(*buffer);
  return true;
}

}  // namespace procpool::detail
#endif

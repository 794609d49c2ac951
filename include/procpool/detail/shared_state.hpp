// procpool - the memory behind procpool::SharedMemory: one memfd a block,
// mapped once per process and found again by id.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "config.hpp"
#include "shm_map.hpp"
#include "system.hpp"

namespace procpool::detail {

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
  static std::shared_ptr<SharedState> add(const std::shared_ptr<SharedState>& state);
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
PROCPOOL_ENGINE_INLINE std::shared_ptr<SharedState> create_shared_state(std::size_t size);

/// The block `id` of `size` bytes that process `pid` holds as fd `fd`: this
/// process's own mapping if it holds it already, else the other process's
/// opened and mapped. Throws std::runtime_error naming what failed.
PROCPOOL_ENGINE_INLINE std::shared_ptr<SharedState> open_shared_state(std::int32_t pid, std::int32_t fd,
                                                                      std::uint64_t id, std::uint64_t size);

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE std::shared_ptr<SharedState> create_shared_state(std::size_t size) {
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

PROCPOOL_ENGINE_INLINE std::shared_ptr<SharedState> open_shared_state(std::int32_t pid, std::int32_t fd,
                                                                      std::uint64_t id, std::uint64_t size) {
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

PROCPOOL_ENGINE_INLINE std::shared_ptr<SharedState> SharedRegistry::add(const std::shared_ptr<SharedState>& state) {
  auto& self = instance();
  std::lock_guard lock(FdRegistry::instance().mutex());
  self.own();
  auto& slot = self.blocks_[state->id()];
  if (auto held = slot.weak.lock()) return held;  // returned, so not destroyed under the lock
  slot = {state, state.get()};
  return state;
}

}  // namespace procpool::detail
#endif

// procpool - claims: how a task queued on a busy worker moves to an idle one
// exactly once.
//
// Each worker shares a small memory area with the pool: one 64-bit claim
// word per slot, indexed by the task's sequence number (per worker) modulo
// the slot count. The pool writes `seq` before it sends task `seq`. Before
// it runs the task, the worker turns the word into `seq | started`; the pool
// may instead turn it into `seq | revoked` and send the task elsewhere. Both
// are a compare-and-swap from `seq`, so exactly one of them wins: a revoked
// task never runs, and a started one is never sent again. A worker that
// reads a task whose word is no longer `seq` (revoked, or the slot reused
// since) skips it without reading its body.
//
// After the slots, one more word counts the SharedMemory blocks the worker
// shared (shm_share) that the pool has handled: mapped, or failed to map. A
// worker waits until the count covers all it shared, then knows that a
// block still not marked mapped never will be (the pool cannot mark a block
// it could not map). The next word says which item of which task the worker
// is running: a crash or a timeout in a chunk names that item. The last one
// holds the last task the worker skipped: once it has read past every task
// taken back from it, the pool sends it tasks again.
#pragma once

#include <sys/mman.h>
#include <sys/stat.h>

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <utility>

#include "shm.hpp"
#include "system.hpp"

namespace procpool::detail {

class ClaimArea {
 public:
  static constexpr std::uint64_t started = std::uint64_t{1} << 63;
  static constexpr std::uint64_t revoked = std::uint64_t{1} << 62;

  ClaimArea() = default;
  ClaimArea(ClaimArea&& other) noexcept
      : words_(std::exchange(other.words_, nullptr)),
        slots_(std::exchange(other.slots_, 0)),
        fd_(std::move(other.fd_)) {}
  ClaimArea& operator=(ClaimArea&& other) noexcept {
    if (this != &other) {
      unmap();
      words_ = std::exchange(other.words_, nullptr);
      slots_ = std::exchange(other.slots_, 0);
      fd_ = std::move(other.fd_);
    }
    return *this;
  }
  ClaimArea(const ClaimArea&) = delete;
  ClaimArea& operator=(const ClaimArea&) = delete;
  ~ClaimArea() { unmap(); }

  /// The pool's side: a new area of at least `min_slots` slots (a page at
  /// least), zeroed; its fd() goes to the worker at launch.
  static ClaimArea create(std::size_t min_slots) {
    const std::size_t slots = std::bit_ceil(std::max<std::size_t>(min_slots, 4096 / sizeof(std::uint64_t)));
    auto [fd, base] = create_mapped_memfd("procpool-claims", slots * sizeof(std::uint64_t) + tail_bytes, true);
    ClaimArea area;
    area.words_ = static_cast<std::atomic<std::uint64_t>*>(base);
    area.slots_ = slots;
    area.fd_ = std::move(fd);
    return area;
  }

  /// The worker's side: maps the area the pool passed as `fd` (and closes
  /// it). An empty area (no claims: every task runs) if `fd` is not one.
  static ClaimArea adopt(int fd) {
    ClaimArea area;
    if (fd < 0) return area;
    struct stat st {};
    const bool valid = ::fstat(fd, &st) == 0 && static_cast<std::size_t>(st.st_size) > tail_bytes &&
                       std::has_single_bit(static_cast<std::size_t>(st.st_size) - tail_bytes);
    void* base = valid
                     ? ::mmap(nullptr, static_cast<std::size_t>(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                     : MAP_FAILED;
    ::close(fd);  // whatever it was: a task must not inherit it
    if (base == MAP_FAILED) return area;
    area.words_ = static_cast<std::atomic<std::uint64_t>*>(base);
    area.slots_ = (static_cast<std::size_t>(st.st_size) - tail_bytes) / sizeof(std::uint64_t);
    return area;
  }

  explicit operator bool() const noexcept { return words_ != nullptr; }
  std::size_t slots() const noexcept { return slots_; }
  /// The fd to pass to the worker (the pool's side, until launched).
  int fd() const noexcept { return fd_.get(); }
  /// The pool has launched the worker: the fd is no longer needed.
  void release_fd() noexcept { fd_.reset(); }

  /// The pool, before it sends task `seq`.
  void offer(std::uint64_t seq) noexcept { word(seq).store(seq, std::memory_order_release); }
  /// The pool: true if task `seq` will never run (it was not started).
  bool revoke(std::uint64_t seq) noexcept {
    std::uint64_t expected = seq;
    return word(seq).compare_exchange_strong(expected, seq | revoked, std::memory_order_acq_rel);
  }
  /// The pool, of a task it sent and holds: whether its worker started it.
  bool was_started(std::uint64_t seq) const noexcept {
    return word(seq).load(std::memory_order_acquire) == (seq | started);
  }
  /// The worker: true if it may run task `seq` (then it must).
  bool claim(std::uint64_t seq) noexcept {
    std::uint64_t expected = seq;
    return word(seq).compare_exchange_strong(expected, seq | started, std::memory_order_acq_rel);
  }

  /// The pool: it has handled (mapped, or failed to map) one more
  /// SharedMemory block the worker shared.
  void share_handled() noexcept {
    if (words_ != nullptr) words_[slots_].fetch_add(1, std::memory_order_release);
  }
  /// The worker: how many of the blocks it shared the pool has handled.
  std::uint64_t handled_shares() const noexcept {
    return words_ != nullptr ? words_[slots_].load(std::memory_order_acquire) : 0;
  }

  /// The worker's word for the item it runs: task `seq`'s item `item` is
  /// ((seq mod 2^32) << 32) | item. Stored before each item; read by the pool
  /// once the worker is gone, to name the item that was running.
  std::atomic<std::uint64_t>* running_word() const noexcept {
    return words_ != nullptr ? &words_[slots_ + 1] : nullptr;
  }
  static constexpr std::uint64_t running_base(std::uint64_t seq) noexcept { return seq << 32; }
  /// The pool: the item of task `seq` its worker last said it was running,
  /// if that word is about this task.
  std::optional<std::uint32_t> running_item(std::uint64_t seq) const noexcept {
    if (words_ == nullptr) return std::nullopt;
    const std::uint64_t word = words_[slots_ + 1].load(std::memory_order_acquire);
    if ((word >> 32) != (seq & 0xffffffffU)) return std::nullopt;
    return static_cast<std::uint32_t>(word);
  }

  /// The worker: it read task `seq` and skipped it (revoked).
  void skipped(std::uint64_t seq) noexcept {
    if (words_ != nullptr) words_[slots_ + 2].store(seq, std::memory_order_release);
  }
  /// The pool: the last task its worker skipped (0 for none yet).
  std::uint64_t last_skipped() const noexcept {
    return words_ != nullptr ? words_[slots_ + 2].load(std::memory_order_acquire) : 0;
  }

 private:
  /// The handled-shares counter, the running item and the last skipped
  /// task, on a cache line of their own.
  static constexpr std::size_t tail_bytes = 64;

  std::atomic<std::uint64_t>& word(std::uint64_t seq) const noexcept { return words_[seq & (slots_ - 1)]; }

  void unmap() noexcept {
    if (words_ != nullptr) ::munmap(words_, slots_ * sizeof(std::uint64_t) + tail_bytes);
    words_ = nullptr;
  }

  std::atomic<std::uint64_t>* words_ = nullptr;
  std::size_t slots_ = 0;
  Fd fd_;
};

static_assert(std::atomic<std::uint64_t>::is_always_lock_free, "claim words are shared between processes");

}  // namespace procpool::detail

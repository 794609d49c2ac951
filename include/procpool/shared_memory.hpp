// procpool - SharedMemory: a block of memory the parent and its workers
// share, sent to a worker and back without copying its bytes.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "detail/serialize.hpp"
#include "detail/shm.hpp"

namespace procpool {

/**
 * A block of memory shared between the pool's processes, like Python's
 * `multiprocessing.shared_memory.SharedMemory`: passed to a task or
 * returned from one, it travels as a reference of a few bytes, and the
 * receiver maps the same pages. Nothing is copied, whatever its size.
 *
 * @code
 * procpool::SharedMemory invert(procpool::SharedMemory image) {
 *   for (auto& pixel : image.as<std::uint8_t>()) pixel = 255 - pixel;
 *   return image;  // the same block: the caller sees the pixels changed
 * }
 * procpool::SharedMemory image(1 << 26);
 * procpool::SharedMemory inverted = pool.apply<invert>(image);
 * assert(inverted.shares_with(image));  // the same block: not one byte was copied
 * @endcode
 *
 * Copies of a SharedMemory refer to the same block; the block goes when the
 * last copy in the last process goes. A worker's writes are seen by the
 * parent and the other workers at once, with no synchronisation: make tasks
 * write disjoint parts, or synchronise them yourself. A block is zero-filled
 * when created and never resized.
 *
 * It can be a task's argument or result (also inside a struct, a vector, a
 * tuple), or an initializer's argument; it cannot travel in a message that
 * outlives the call (std::logic_error). In any other cereal archive it is
 * saved and loaded by value, its bytes copied (binary archives only).
 *
 * Blocks are memfds the receiver opens through `/proc/PID/fd/N`, as the pool's
 * large messages are: a worker that cannot (no /proc, another user) fails
 * the task with a message saying so. A block reaches a worker only by
 * travelling: one the parent holds in a global is not mapped in a worker
 * forked from it (sending that copy from the worker throws
 * std::logic_error).
 *
 * A value type: copying it is cheap and thread-safe; the bytes need the
 * caller's synchronisation.
 */
class SharedMemory {
 public:
  /// An empty block (size 0).
  SharedMemory() = default;

  /**
   * A new zero-filled block.
   * @param size its size in bytes; 0 gives an empty block.
   * @throws std::system_error if the memory cannot be had (memfd_create,
   *         ftruncate or mmap failed; ENOMEM, EMFILE).
   */
  explicit SharedMemory(std::size_t size) {
    if (size != 0) state_ = detail::create_shared_state(size);
  }

  /// Its bytes; nullptr when empty.
  std::byte* data() const noexcept { return state_ ? reinterpret_cast<std::byte*>(state_->data()) : nullptr; }
  /// Its size in bytes.
  std::size_t size() const noexcept { return state_ ? state_->size() : 0; }
  /// Whether its size is 0.
  bool empty() const noexcept { return !state_; }

  /**
   * Its bytes as an array of `T`.
   * @tparam T a trivially copyable type; the block holds size() / sizeof(T)
   *         of them (a block's bytes are aligned for any such type).
   */
  template <class T>
  std::span<T> as() const noexcept {
    static_assert(std::is_trivially_copyable_v<T>, "SharedMemory::as<T>: T must be trivially copyable");
    return {reinterpret_cast<T*>(data()), size() / sizeof(T)};
  }

  /// Whether the two are the same block (in this process, the same mapping).
  bool shares_with(const SharedMemory& other) const noexcept { return state_ && state_ == other.state_; }

  /// cereal: in a pool's messages, a reference; elsewhere, the bytes.
  template <class Archive>
  void save(Archive& ar) const {
    if constexpr (std::is_same_v<Archive, detail::OutputArchive>) {
      if (!state_) {
        ar(std::uint8_t{0});
        return;
      }
      if (state_->inherited()) {
        throw std::logic_error("procpool::SharedMemory: this block was made by process " +
                               std::to_string(state_->owner()) +
                               " and copied into this one by fork(), which does not map it here; pass it to the "
                               "worker as an argument or through the initializer");
      }
      ar.share(state_);
      ar(std::uint8_t{1}, static_cast<std::int32_t>(::getpid()), static_cast<std::int32_t>(state_->fd.get()),
         state_->id(), static_cast<std::uint64_t>(state_->size()));
    } else {
      ar(cereal::make_size_tag(static_cast<std::uint64_t>(size())));
      if (state_) ar(cereal::binary_data(state_->data(), state_->size()));
    }
  }
  /// cereal: see save().
  template <class Archive>
  void load(Archive& ar) {
    if constexpr (std::is_same_v<Archive, detail::InputArchive>) {
      std::uint8_t kind = 0;
      ar(kind);
      if (kind == 0) {
        state_.reset();
        return;
      }
      if (kind != 1) throw std::runtime_error("procpool::SharedMemory: a corrupt reference");
      std::int32_t pid = 0, fd = 0;
      std::uint64_t id = 0, bytes = 0;
      ar(pid, fd, id, bytes);
      state_ = detail::open_shared_state(pid, fd, id, bytes);
    } else {
      std::uint64_t bytes = 0;
      ar(cereal::make_size_tag(bytes));
      SharedMemory copy(static_cast<std::size_t>(bytes));
      if (bytes != 0) ar(cereal::binary_data(copy.state_->data(), static_cast<std::size_t>(bytes)));
      *this = std::move(copy);
    }
  }

 private:
  std::shared_ptr<detail::SharedState> state_;
};

}  // namespace procpool

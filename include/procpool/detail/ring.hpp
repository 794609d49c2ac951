// procpool - a growable circular buffer: a queue whose slots are reused, so a
// steady stream through it allocates nothing.
#pragma once

#include <cstddef>
#include <iterator>
#include <memory>
#include <utility>

namespace procpool::detail {

/**
 * A double-ended queue in one array of slots, for default-constructible,
 * movable T. Its capacity doubles when full and never shrinks; a removed
 * element's slot is reset to T{} (so it lets go of what it held) and
 * reused. Removing from the middle moves the elements after it. Not
 * thread-safe.
 */
template <class T>
class Ring {
 public:
  Ring() = default;
  Ring(Ring&& other) noexcept
      : slots_(std::move(other.slots_)),
        capacity_(std::exchange(other.capacity_, 0)),
        head_(std::exchange(other.head_, 0)),
        size_(std::exchange(other.size_, 0)) {}
  Ring& operator=(Ring&& other) noexcept {
    slots_ = std::move(other.slots_);
    capacity_ = std::exchange(other.capacity_, 0);
    head_ = std::exchange(other.head_, 0);
    size_ = std::exchange(other.size_, 0);
    return *this;
  }

  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  T& operator[](std::size_t k) { return slots_[slot(k)]; }
  const T& operator[](std::size_t k) const { return slots_[slot(k)]; }
  T& front() { return (*this)[0]; }
  const T& front() const { return (*this)[0]; }
  T& back() { return (*this)[size_ - 1]; }

  void push_back(T value) {
    if (size_ == capacity_) grow();
    slots_[slot(size_)] = std::move(value);
    ++size_;
  }
  void push_front(T value) {
    if (size_ == capacity_) grow();
    head_ = (head_ + capacity_ - 1) & (capacity_ - 1);
    slots_[head_] = std::move(value);
    ++size_;
  }
  void pop_front() {
    slots_[head_] = T{};
    head_ = (head_ + 1) & (capacity_ - 1);
    if (--size_ == 0 && capacity_ > keep_capacity) release();
  }
  /// Removes element k; those after it move up one.
  void erase(std::size_t k) {
    for (; k + 1 < size_; ++k) (*this)[k] = std::move((*this)[k + 1]);
    (*this)[size_ - 1] = T{};
    --size_;
  }
  void clear() {
    while (size_ > 0) pop_front();
    head_ = 0;
  }
  std::size_t capacity() const { return capacity_; }

  /// Slots an emptied ring keeps; a larger one (after a burst, say a
  /// map_async of a million chunks) lets its array go.
  static constexpr std::size_t keep_capacity = std::size_t{1} << 16;

  template <class Ring_, class V>
  class Iterator {
   public:
    using iterator_category = std::forward_iterator_tag;
    using value_type = T;
    using difference_type = std::ptrdiff_t;
    using pointer = V*;
    using reference = V&;
    Iterator() = default;
    Iterator(Ring_* ring, std::size_t k) : ring_(ring), k_(k) {}
    V& operator*() const { return (*ring_)[k_]; }
    V* operator->() const { return &(*ring_)[k_]; }
    Iterator& operator++() {
      ++k_;
      return *this;
    }
    Iterator operator++(int) {
      Iterator old = *this;
      ++k_;
      return old;
    }
    bool operator==(const Iterator& other) const { return k_ == other.k_; }

   private:
    Ring_* ring_ = nullptr;
    std::size_t k_ = 0;
  };
  using iterator = Iterator<Ring, T>;
  using const_iterator = Iterator<const Ring, const T>;
  iterator begin() { return {this, 0}; }
  iterator end() { return {this, size_}; }
  const_iterator begin() const { return {this, 0}; }
  const_iterator end() const { return {this, size_}; }

 private:
  std::size_t slot(std::size_t k) const { return (head_ + k) & (capacity_ - 1); }

  void release() {
    slots_.reset();
    capacity_ = 0;
    head_ = 0;
  }

  void grow() {
    const std::size_t capacity = capacity_ == 0 ? 8 : 2 * capacity_;
    auto slots = std::make_unique<T[]>(capacity);
    for (std::size_t k = 0; k < size_; ++k) slots[k] = std::move((*this)[k]);
    slots_ = std::move(slots);
    capacity_ = capacity;
    head_ = 0;
  }

  std::unique_ptr<T[]> slots_;
  std::size_t capacity_ = 0;  // a power of two, or 0
  std::size_t head_ = 0;
  std::size_t size_ = 0;
};

}  // namespace procpool::detail

/// @file
/// The lazy result range of imap and imap_unordered: procpool::IMap.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include <fmt/format.h>

#include "call_options.hpp"
#include "detail/imap_feed.hpp"
#include "errors.hpp"
#include "result.hpp"

namespace procpool {

namespace detail {
template <class T>
struct IMapAccess;
}  // namespace detail

/**
 * The results of `imap` (input order) or `imap_unordered` (completion
 * order), produced lazily: the input is read only as far as needed to keep
 * `Options::imap_prefetch` chunks in flight (fewer while they hold more than
 * `Options::imap_prefetch_bytes`), so an endless input runs in bounded
 * memory, and a consumer that stops reading stops the work.
 *
 * Iterate it with range-for, or call next(). An item whose task failed
 * throws (RemoteError, WorkerLost...) when it is reached; the iteration can
 * go on past it with ++it or next().
 *
 * Example:
 * @code
 * for (long v : pool.imap<square>(std::views::iota(0L), 16)) if (v > 1000) break;
 * @endcode
 *
 * Not thread-safe: consume it from one thread. Destroying it early cancels
 * the tasks not yet started.
 */
template <class T>
class IMap {
  using Item = std::variant<T, std::exception_ptr>;

 public:
  /// What end() returns: an iterator equals it once every result was consumed.
  struct sentinel {};

  /// Input iterator over the results; all iterators of one IMap share its position.
  class iterator {
   public:
    /// The result type.
    using value_type = T;
    /// Required of an iterator; iterators of an IMap are never subtracted.
    using difference_type = std::ptrdiff_t;
    /// A single-pass input iterator.
    using iterator_concept = std::input_iterator_tag;

    /// A singular iterator, only to be assigned to.
    iterator() = default;
    /**
     * The current result, waiting for it if needed.
     * @return a reference valid until the iterator is advanced.
     * @throws Error the task's error (RemoteError, WorkerLost, ...) if it failed.
     */
    T& operator*() const { return owner_->current(); }
    /// Member access to the current result; as operator*().
    T* operator->() const { return &owner_->current(); }
    /// Moves past the current result, a failed one included. @return `*this`.
    iterator& operator++() {
      owner_->advance();
      return *this;
    }
    /// As the prefix form; returns nothing, as input iterators may.
    void operator++(int) { ++*this; }
    /// Whether every result was consumed; may read more of the input to find out.
    friend bool operator==(const iterator& it, sentinel) { return it.at_end(); }

   private:
    friend class IMap;
    explicit iterator(IMap* owner) : owner_(owner) {}
    bool at_end() const { return !owner_->has_next(); }
    IMap* owner_ = nullptr;
  };

  /// Takes over `other`'s results; `other` may then only be destroyed or assigned to.
  IMap(IMap&& other) noexcept = default;
  /// Cancels the tasks not yet started of the results this one held, as the
  /// destructor does, then takes over `other`'s results.
  IMap& operator=(IMap&& other) noexcept {
    if (this != &other) {
      feed_ = std::move(other.feed_);  // the old feed's destructor cancels its tasks
      buffer_ = std::move(other.buffer_);
      current_ = std::move(other.current_);
      progress_ = std::move(other.progress_);
      handed_ = other.handed_;
      progress_failed_ = other.progress_failed_;
    }
    return *this;
  }
  /// Not copyable: the results are consumed once.
  IMap(const IMap&) = delete;
  /// Not copyable: the results are consumed once.
  IMap& operator=(const IMap&) = delete;
  /// Cancels the tasks not yet started; the input is read no further.
  ~IMap() = default;

  /// An iterator at the current position (results already consumed stay consumed).
  iterator begin() { return iterator(this); }
  /// The end of the results.
  sentinel end() { return {}; }

  /// The range results() returns: each item's value or error, in turn.
  template <class Owner>
  class ResultRange {
   public:
    /// What end() returns.
    struct sentinel {};
    /// Input iterator over the outcomes.
    class iterator {
     public:
      /// One item's outcome.
      using value_type = Result<T>;
      /// Required of an iterator; never used.
      using difference_type = std::ptrdiff_t;
      /// A single-pass input iterator.
      using iterator_concept = std::input_iterator_tag;
      /// A singular iterator, only to be assigned to.
      iterator() = default;
      /// The current item's value or error, waiting for it if needed.
      Result<T>& operator*() const { return range_->current(); }
      /// Member access to operator*().
      Result<T>* operator->() const { return &range_->current(); }
      /// Moves to the next item. @return `*this`.
      iterator& operator++() {
        range_->advance();
        return *this;
      }
      /// As the prefix form.
      void operator++(int) { ++*this; }
      /// Whether every item was taken.
      bool operator==(sentinel) const { return range_->at_end(); }

     private:
      friend class ResultRange;
      explicit iterator(ResultRange* range) : range_(range) {}
      ResultRange* range_ = nullptr;
    };

    /// Over `owner`: an IMap, or a pointer to one.
    explicit ResultRange(Owner owner) : owner_(std::move(owner)) {}
    /// Not copied or moved: it holds the current item its iterators refer
    /// to, so it must outlive them (as in a range-for).
    ResultRange(const ResultRange&) = delete;
    /// As the copy constructor.
    ResultRange& operator=(const ResultRange&) = delete;
    /// An iterator at the current position.
    iterator begin() { return iterator(this); }
    /// The end of the items.
    sentinel end() { return {}; }

   private:
    IMap& imap() {
      if constexpr (std::is_pointer_v<Owner>) {
        return *owner_;
      } else {
        return owner_;
      }
    }
    Result<T>& current() {
      if (!current_) {
        std::optional<T> value;
        try {
          value = imap().next();
        } catch (...) {
          current_.emplace(std::current_exception());
          return *current_;
        }
        if (!value) throw std::logic_error("procpool: IMap::results() iterated past its end");
        current_.emplace(std::move(*value));
      }
      return *current_;
    }
    void advance() {
      (void)current();
      current_.reset();
    }
    bool at_end() { return !current_ && !imap().has_next(); }

    Owner owner_;
    std::optional<Result<T>> current_;
  };

  /**
   * The results as `procpool::Result<T>`: each item's value or error, in
   * turn, so a range-for goes on past failed items without try/catch.
   *
   * @code
   * for (const auto& r : pool.imap<parse>(files).results()) if (!r) log(r.error_message());
   * @endcode
   *
   * @return a single-pass range over this IMap (which must outlive it).
   */
  ResultRange<IMap*> results() & { return ResultRange<IMap*>(this); }
  /// results() of a temporary IMap, which the range then owns.
  ResultRange<IMap> results() && { return ResultRange<IMap>(std::move(*this)); }

  /**
   * The next result, waiting for it if needed.
   * @return the result, or nullopt after the last.
   * @throws Error the task's error (RemoteError, WorkerLost, ...) if it failed;
   *         the next call goes on with the result after it.
   */
  std::optional<T> next() { return next_until(std::nullopt); }

  /**
   * Like next(), waiting at most `timeout`.
   * @param timeout how long to wait at most.
   * @return as next().
   * @throws TimeoutError no result arrived in time (the tasks go on running).
   * @throws Error the task's error, as next().
   */
  template <class Rep, class Period>
  std::optional<T> next(std::chrono::duration<Rep, Period> timeout) {
    return next_until(detail::Clock::now() + detail::clamp_timeout(timeout));
  }

 private:
  friend struct detail::IMapAccess<T>;

  IMap(std::unique_ptr<detail::ImapFeed> feed, ProgressCallback progress)
      : feed_(std::move(feed)), progress_(std::move(progress)) {}

  /// An item is handed to the consumer: progress counts it, on this thread.
  void report_handed() {
    ++handed_;
    if (!progress_) return;
    try {
      progress_(handed_, feed_->total());
    } catch (...) {
      if (!progress_failed_) {
        progress_failed_ = true;
        detail::report_callback_exception(feed_->job().call(), "progress callback", "the call goes on");
      }
    }
  }

  std::optional<T> next_until(detail::Deadline deadline) {
    if (!has_next()) return std::nullopt;
    if (!current_) fetch(deadline);
    Item item = std::move(*current_);
    current_.reset();
    if (auto* error = std::get_if<std::exception_ptr>(&item)) std::rethrow_exception(*error);
    return std::move(std::get<T>(item));
  }

  T& current() {
    if (!current_) fetch(std::nullopt);
    if (auto* error = std::get_if<std::exception_ptr>(&*current_)) std::rethrow_exception(*error);
    return std::get<T>(*current_);
  }

  void advance() {
    if (!current_ && has_next()) fetch(std::nullopt);  // skipping still consumes one
    current_.reset();
  }

  bool has_next() { return current_ || !buffer_.empty() || feed_->more(); }

  /// Decodes what the feed took at once into buffer_ (or the input's
  /// error), then makes the first current. All of it: an outcome not yet
  /// decoded holds its worker's shared result buffer.
  void fetch(detail::Deadline deadline) {
    while (buffer_.empty()) {
      auto piece = feed_->next(deadline);
      if (piece.input_error) {
        buffer_.emplace_back(std::in_place_index<1>, std::move(piece.input_error));
        break;
      }
      decode(piece);
      // One at a time: if decoding one throws, the rest are still there.
      while (feed_->has_taken()) {
        auto more = feed_->next(std::nullopt);
        decode(more);
      }
    }
    current_.emplace(std::move(buffer_.front()));
    buffer_.pop_front();
    report_handed();
  }

  void decode(detail::ImapFeed::Piece& piece) {
    const auto& job = feed_->job();
    detail::decode_chunk<T>(
        piece.outcome, job.call(), job.raise_original(), piece.first, piece.count,
        [&](std::size_t, T&& value) { buffer_.emplace_back(std::in_place_index<0>, std::move(value)); },
        [&](std::size_t, std::exception_ptr error) { buffer_.emplace_back(std::in_place_index<1>, std::move(error)); });
  }

  std::unique_ptr<detail::ImapFeed> feed_;
  std::deque<Item> buffer_;  // decoded, not yet handed over
  std::optional<Item> current_;
  ProgressCallback progress_;  // CallOptions::progress: counts the items handed over
  std::size_t handed_ = 0;
  bool progress_failed_ = false;
};

namespace detail {
template <class T>
struct IMapAccess {
  template <class... A>
  static IMap<T> make(A&&... args) {
    return IMap<T>(std::forward<A>(args)...);
  }
};
}  // namespace detail

}  // namespace procpool

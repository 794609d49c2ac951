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
#include "detail/dispatcher.hpp"
#include "detail/job.hpp"
#include "errors.hpp"
#include "result.hpp"

namespace procpool {

namespace detail {

/// Pulls the next items of an imap input into a task frame. Type-erased so
/// IMap<T> does not carry the input's type.
class ChunkSource {
 public:
  virtual ~ChunkSource() = default;
  /// Appends up to `max_items` items (with the callable) to a task frame
  /// body, listing the SharedMemory blocks they refer to in `shares`;
  /// returns how many. 0 means the input is exhausted.
  virtual std::uint32_t fill(TaskBytes& frame, SharedStates& shares, std::size_t max_items) = 0;
  virtual std::uint64_t handler_id() const = 0;
};

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
      if (job_) job_->cancel();
      dispatcher_ = std::move(other.dispatcher_);
      source_ = std::move(other.source_);
      job_ = std::move(other.job_);
      ordered_ = other.ordered_;
      chunksize_ = other.chunksize_;
      prefetch_ = other.prefetch_;
      prefetch_bytes_ = other.prefetch_bytes_;
      total_ = other.total_;
      bytes_out_ = other.bytes_out_;
      submitted_ = other.submitted_;
      taken_ = other.taken_;
      next_input_ = other.next_input_;
      input_done_ = other.input_done_;
      spans_ = std::move(other.spans_);
      input_error_ = std::move(other.input_error_);
      batch_ = std::move(other.batch_);
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
  ~IMap() {
    if (job_) job_->cancel();
  }

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
    return next_until(detail::Clock::now() + std::chrono::duration_cast<detail::Clock::duration>(timeout));
  }

 private:
  friend struct detail::IMapAccess<T>;

  IMap(std::shared_ptr<detail::Dispatcher> dispatcher, std::unique_ptr<detail::ChunkSource> source,
       std::shared_ptr<detail::JobState> job, bool ordered, std::size_t chunksize, std::size_t prefetch,
       std::size_t prefetch_bytes, std::optional<std::size_t> total, ProgressCallback progress)
      : dispatcher_(std::move(dispatcher)),
        source_(std::move(source)),
        job_(std::move(job)),
        ordered_(ordered),
        chunksize_(chunksize),
        prefetch_(prefetch),
        prefetch_bytes_(prefetch_bytes),
        total_(total),
        progress_(std::move(progress)) {}

  /// An item is handed to the consumer: progress counts it, on this thread.
  void report_handed() {
    ++handed_;
    if (!progress_) return;
    try {
      progress_(handed_, total_);
    } catch (...) {
      if (!progress_failed_) {
        progress_failed_ = true;
        fmt::print(stderr, "procpool: a {} progress callback threw {}: {}; the call goes on\n", job_->call(),
                   detail::current_exception_type_name(), detail::current_exception_message());
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

  bool has_next() {
    if (current_ || !buffer_.empty() || !batch_.empty()) return true;
    top_up();
    return taken_ < submitted_ || input_error_ != nullptr;
  }

  /// Keeps up to `prefetch_` chunks in flight, reading the input only that
  /// far, and fewer while their bytes (tasks sent and results not yet taken)
  /// pass `prefetch_bytes_`. An input that throws ends the input there: the
  /// results before it are still yielded, then its exception, in the
  /// position where it happened.
  void top_up() {
    if (input_done_ || !room_for_more(0)) return;
    // Refills in batches of a quarter of the prefetch: one submission (and
    // one wake-up of the I/O thread) per batch, not per chunk taken.
    const std::uint64_t out = submitted_ - taken_;
    if (out != 0 && out + std::max<std::size_t>(1, prefetch_ / 4) > prefetch_) return;
    std::vector<detail::Chunk> chunks;
    try {
      pull_chunks(chunks);
    } catch (...) {
      input_done_ = true;
      input_error_ = std::current_exception();
    }
    if (chunks.empty()) return;
    const std::size_t count = chunks.size();
    try {
      dispatcher_->submit(std::move(chunks));
    } catch (...) {
      // Refused (the pool was closed meanwhile): they are not waited for,
      // the input is read no further, and the refusal comes after the
      // results submitted before it, as an input's own exception would.
      for (std::uint64_t index = submitted_; index < submitted_ + count; ++index) {
        if (auto span = spans_.extract(index)) bytes_out_ -= span.mapped().bytes;
      }
      input_done_ = true;
      input_error_ = std::current_exception();  // it comes before any error the input raised after
      return;
    }
    submitted_ += count;
  }

  /// Whether one more chunk may be read, with `pending` chunks read but not yet submitted.
  bool room_for_more(std::size_t pending) const {
    const std::uint64_t out = submitted_ + pending - taken_;
    if (out >= prefetch_) return false;
    // Adaptive chunks of one item until a first chunk has been timed, and
    // only a few of them: chunks sized blind would be sized wrong.
    if (chunksize_ == adaptive && out >= 2 * dispatcher_->processes() && !job_->item_ns()) return false;
    // Always one chunk, however large, or nothing would ever run.
    return out == 0 || prefetch_bytes_ == 0 || bytes_out_ + job_->ready_bytes() < prefetch_bytes_;
  }

  void pull_chunks(std::vector<detail::Chunk>& chunks) {
    while (!input_done_ && room_for_more(chunks.size())) {
      detail::Chunk chunk{job_, submitted_ + chunks.size(), dispatcher_->new_frame(), {}};
      std::size_t start = detail::begin_task_frame(chunk.frame, source_->handler_id());
      std::uint32_t count = source_->fill(chunk.frame, chunk.shares, next_chunksize());
      if (count == 0) {
        input_done_ = true;
        break;
      }
      detail::finish_task_frame(chunk.frame, start, count);
      spans_.emplace(chunk.index, Span{next_input_, std::size_t{count}, chunk.frame.size()});
      bytes_out_ += chunk.frame.size();
      next_input_ += count;
      chunks.push_back(std::move(chunk));
    }
  }

  /// The size of the next chunk: the fixed chunksize, or with adaptive
  /// chunking about `adaptive_chunk_time` of work at the recent time per
  /// item, and at most half a worker's share of what is left of a sized input.
  std::size_t next_chunksize() const {
    if (chunksize_ != adaptive) return chunksize_;
    constexpr std::size_t most = std::size_t{1} << 16;
    const auto per_item = job_->item_ns();
    if (!per_item) return 1;
    const double target = std::chrono::duration<double, std::nano>(adaptive_chunk_time).count();
    std::size_t size = *per_item * static_cast<double>(most) <= target
                           ? most
                           : std::max<std::size_t>(1, static_cast<std::size_t>(target / *per_item));
    if (total_ && *total_ > next_input_) {
      const std::size_t share = (*total_ - next_input_) / (2 * dispatcher_->processes());
      size = std::min(size, std::max<std::size_t>(1, share));
    }
    return size;
  }

  void fetch(detail::Deadline deadline) {
    while (buffer_.empty()) {
      if (batch_.empty()) {
        top_up();
        if (taken_ == submitted_ && input_error_) {
          // Everything read before the failure has been yielded: now the failure.
          buffer_.emplace_back(std::in_place_index<1>, std::exchange(input_error_, nullptr));
          break;
        }
        // A batch of what is ready at once, bounded like the prefetch.
        auto got = job_->take_some(ordered_ ? std::optional<std::uint64_t>(taken_) : std::nullopt, deadline,
                                   std::max<std::size_t>(1, prefetch_ / 4),
                                   prefetch_bytes_ == 0 ? SIZE_MAX : prefetch_bytes_ / 4);
        if (got.empty()) throw TimeoutError(fmt::format("procpool: no {} result arrived in time", job_->call()));
        taken_ += got.size();
        for (auto& taken : got) batch_.push_back(std::move(taken));
      }
      // One at a time: if a decode throws, the rest of the batch is still
      // there for the next call.
      while (!batch_.empty()) {
        auto [index, outcome] = std::move(batch_.front());
        batch_.pop_front();
        auto span = spans_.extract(index).mapped();
        bytes_out_ -= span.bytes;
        detail::decode_chunk<T>(
            outcome, job_->call(), job_->raise_original(), span.first, span.count,
            [&](std::size_t, T&& value) { buffer_.emplace_back(std::in_place_index<0>, std::move(value)); },
            [&](std::size_t, std::exception_ptr error) {
              buffer_.emplace_back(std::in_place_index<1>, std::move(error));
            });
      }
    }
    current_.emplace(std::move(buffer_.front()));
    buffer_.pop_front();
    report_handed();
  }

  std::shared_ptr<detail::Dispatcher> dispatcher_;
  std::unique_ptr<detail::ChunkSource> source_;
  std::shared_ptr<detail::JobState> job_;
  bool ordered_;
  std::size_t chunksize_;
  std::size_t prefetch_;
  std::size_t prefetch_bytes_;
  std::optional<std::size_t> total_;  // the input's length, if known
  std::size_t bytes_out_ = 0;         // task bytes of the chunks submitted and not taken
  std::uint64_t submitted_ = 0;       // chunks handed to the dispatcher
  std::uint64_t taken_ = 0;           // chunks taken from the mailbox
  std::size_t next_input_ = 0;
  bool input_done_ = false;
  struct Span {
    std::size_t first;  // index of the chunk's first input
    std::size_t count;  // its items
    std::size_t bytes;  // its task frame's size
  };
  std::unordered_map<std::uint64_t, Span> spans_;
  std::exception_ptr input_error_;  // the input threw; yielded after what came before it
  std::deque<std::pair<std::uint64_t, detail::ChunkOutcome>> batch_;  // taken, not yet decoded
  std::deque<Item> buffer_;
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

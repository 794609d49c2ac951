/// @file
/// A terminal progress bar, usable as a ProgressCallback: procpool::ProgressBar.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

#include "detail/config.hpp"

namespace procpool {

/**
 * When a `ProgressBar` draws itself.
 *
 * @code
 * procpool::ProgressBar bar(procpool::ProgressBarOptions{.label = "files", .draw = procpool::ProgressDraw::never});
 * @endcode
 */
enum class ProgressDraw {
  /// Only when `ProgressBarOptions::output` is a terminal (`isatty`), so
  /// output piped to a file or another program is never littered with
  /// redraws. The default.
  automatic,
  /// Always, even into a pipe or a file.
  always,
  /// Never: the bar only keeps count (`ProgressBar::line()` still works).
  never,
};

/**
 * Settings of a `ProgressBar`, used with designated initializers; every field
 * has a default, so name only what you change:
 *
 * @code
 * procpool::ProgressBar bar(procpool::ProgressBarOptions{.label = "images", .summary_when_not_terminal = true});
 * @endcode
 *
 * New fields are only ever added at the end.
 *
 * A plain value without locks; a ProgressBar keeps its own copy.
 */
struct ProgressBarOptions {
  /// Printed before the bar, followed by ": "; empty for none.
  std::string label{};
  /// Whether to draw; see `ProgressDraw`.
  ProgressDraw draw = ProgressDraw::automatic;
  /// Where the bar is drawn, and, in `ProgressDraw::automatic` mode, the
  /// stream whose being a terminal decides whether it is drawn at all.
  std::FILE* output = stderr;
  /// If set, receives the text to draw instead of `output` (`output` still
  /// decides `automatic` mode). Called with the bar's lock held: it must not
  /// call back into the bar.
  std::function<void(std::string_view text)> sink{};
  /// The clock the rate, elapsed time and ETA are measured with; empty
  /// means `std::chrono::steady_clock::now`. Tests inject a fake one.
  std::function<std::chrono::steady_clock::time_point()> clock{};
  /// Least time between two redraws; updates in between only record the
  /// count. The first update and the one reaching the total always draw.
  std::chrono::milliseconds min_interval{100};
  /// Width of the bar itself, in characters.
  std::size_t width = 30;
  /// In `automatic` mode, when `output` is not a terminal: write one plain
  /// line with the final state at `finish()` (for logs) instead of nothing.
  bool summary_when_not_terminal = false;
};

namespace detail {

/// "mm:ss", or "h:mm:ss" from an hour on.
PROCPOOL_ENGINE_INLINE std::string format_progress_duration(double seconds);

/// What every copy of one ProgressBar shares: the pool calls its copy on the
/// callback thread while the user's thread may call finish() on another.
class ProgressState {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;

  explicit ProgressState(ProgressBarOptions options);

  ProgressState(const ProgressState&) = delete;
  ProgressState& operator=(const ProgressState&) = delete;

  // The last copy of the bar is gone: end its line, so whatever the program
  // prints next starts on a fresh one. Output errors are dropped here.
  ~ProgressState();

  void update(std::size_t done, std::optional<std::size_t> total);

  void finish();

  std::string line();

  void print_above(std::string_view text);

  bool live() const noexcept { return live_; }

  /// The columns `text` takes on a terminal, counting each UTF-8 character
  /// as one: what is padded with spaces to blank a line out.
  static std::size_t display_columns(std::string_view text) noexcept {
    std::size_t columns = 0;
    for (char c : text) columns += (static_cast<unsigned char>(c) & 0xC0) != 0x80 ? 1 : 0;
    return columns;
  }

 private:
  void draw(TimePoint now, bool last);

  std::string render(TimePoint now) const;

  void write(std::string_view text);

  std::mutex mutex_;
  ProgressBarOptions options_;
  TimePoint start_;
  bool live_ = false;     // redraws with '\r'
  bool summary_ = false;  // one line at finish() instead
  std::size_t done_ = 0;
  std::optional<std::size_t> total_;
  bool updated_ = false;
  bool finished_ = false;
  bool drawn_ = false;
  TimePoint drawn_at_{};
  std::size_t drawn_done_ = 0;
  std::size_t drawn_length_ = 0;  // in columns (display_columns)
};

}  // namespace detail

/**
 * A progress bar on the terminal: count, total, percentage, rate, elapsed
 * time and ETA after a label, redrawn in place with `\r` at most every
 * `min_interval` (100 ms), plus the final state.
 *
 * It is a `procpool::ProgressCallback`: `bar(done, total)` records that
 * `done` items of `total` are finished (`total` empty when unknown, which
 * drops the percentage and ETA). `finish()` draws the final state and ends
 * the line; the last copy's destructor does so too if nobody did.
 *
 * By default it draws only when stderr is a terminal: when stderr goes to a
 * pipe or a file it prints nothing at all (`summary_when_not_terminal` asks
 * for one final line there), so logs and piped output are never garbled.
 *
 * @code
 * procpool::ProgressBar bar("squares");
 * std::vector<long> xs(10'000);
 * std::size_t done = 0;
 * for (long v : pool.imap_unordered<square>(xs)) bar(++done, xs.size());
 * bar.finish();   // squares: 100% [##############################] 10000/10000 | ...
 * @endcode
 *
 * Copies share one bar (a copy is a handle), so the copy a pool stores and
 * calls on its callback thread and the one the caller keeps draw the same line.
 * Thread-safe: every const member function may be called from any thread on
 * any copy; assigning to or moving from one ProgressBar object while another
 * thread uses that same object is a data race, as for any handle. Print the
 * program's own lines with println(): other output to the same terminal while
 * the bar is live lands in the middle of its line.
 */
class ProgressBar {
 public:
  /**
   * A bar without a label, drawn on stderr when it is a terminal.
   * @throws std::bad_alloc
   */
  ProgressBar() : ProgressBar(ProgressBarOptions{}) {}

  /**
   * A bar showing `label`, drawn on stderr when it is a terminal.
   * @param label printed before the bar, followed by ": ".
   * @throws std::bad_alloc
   */
  explicit ProgressBar(std::string label) : ProgressBar(ProgressBarOptions{.label = std::move(label)}) {}

  /**
   * A bar with the given settings. The clock starts now.
   * @param options label, when and where to draw, clock, redraw interval.
   * @throws std::bad_alloc
   */
  explicit ProgressBar(ProgressBarOptions options)
      : state_(std::make_shared<detail::ProgressState>(std::move(options))) {}

  /// Another handle to the same bar. Thread-safe.
  ProgressBar(const ProgressBar&) = default;
  /// Takes over the handle; `other` then does nothing.
  ProgressBar(ProgressBar&& other) noexcept = default;
  /// Makes this a handle to `other`'s bar (releasing its own).
  ProgressBar& operator=(const ProgressBar&) = default;
  /// Takes over `other`'s handle (releasing its own).
  ProgressBar& operator=(ProgressBar&& other) noexcept = default;
  /// The last copy to go finishes the bar (see `finish()`). Never throws:
  /// an error from the sink at this point is dropped.
  ~ProgressBar() = default;

  /**
   * Records progress and redraws if the last redraw is `min_interval` old,
   * or if `done` reached `total`. Ignored after `finish()`.
   * @param done items finished so far.
   * @param total items in all, or empty when unknown.
   * @throws whatever `ProgressBarOptions::sink` throws; errors writing to
   *         `output` are ignored.
   *
   * Thread-safe.
   */
  void operator()(std::size_t done, std::optional<std::size_t> total) const {
    if (state_) state_->update(done, total);
  }

  /**
   * Draws the final state and ends the line, once: later calls, and the
   * updates and destructor after it, do nothing. Draws nothing if the bar
   * never had an update, or does not draw (see `ProgressDraw`).
   * @throws whatever `ProgressBarOptions::sink` throws.
   *
   * Thread-safe.
   */
  void finish() const {
    if (state_) state_->finish();
  }

  /**
   * The bar's line as it would be drawn now (no `\r`, no newline), whether
   * or not it draws; e.g. to put it in a log message.
   * @return e.g. "squares:  25% [#######-----------------------] 25/100 | 2.5 items/s | 00:10 elapsed | ETA 00:30".
   *
   * Thread-safe.
   */
  std::string line() const { return state_ ? state_->line() : std::string(); }

  /**
   * Prints `text` and a newline above the bar, then draws the bar again below
   * it, so the program's own messages and a live bar do not collide. Goes to
   * the bar's output (stderr by default, or its sink); without a live bar, or
   * after finish(), just prints the line there (stderr for a default-constructed bar).
   * @param text one line, without its newline.
   * @throws whatever `ProgressBarOptions::sink` throws.
   *
   * Thread-safe.
   */
  void println(std::string_view text) const {
    if (state_) {
      state_->print_above(text);
    } else {
      // Errors are dropped, as the bar's own are.
      std::fwrite(text.data(), 1, text.size(), stderr);
      std::fputc('\n', stderr);
    }
  }

  /**
   * Whether the bar redraws itself in place (`always`, or `automatic` on a
   * terminal).
   * Thread-safe.
   */
  bool live() const noexcept { return state_ && state_->live(); }

 private:
  std::shared_ptr<detail::ProgressState> state_;
};

}  // namespace procpool

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE std::string format_progress_duration(double seconds) {
  const auto total = static_cast<std::uint64_t>(std::max(seconds, 0.0));
  const std::uint64_t hours = total / 3600, minutes = total / 60 % 60, secs = total % 60;
  if (hours > 0) return fmt::format("{}:{:02}:{:02}", hours, minutes, secs);
  return fmt::format("{:02}:{:02}", minutes, secs);
}

PROCPOOL_ENGINE_INLINE void ProgressState::draw(TimePoint now, bool last) {
  std::string text = '\r' + render(now);
  // Blank out what is left of a longer previous line (the rate or ETA can shrink).
  const std::size_t length = display_columns(text) - 1;
  if (length < drawn_length_) text.append(drawn_length_ - length, ' ');
  if (last) text += '\n';
  drawn_ = true;
  drawn_at_ = now;
  drawn_done_ = done_;
  drawn_length_ = length;
  write(text);
}

PROCPOOL_ENGINE_INLINE std::string ProgressState::render(TimePoint now) const {
  const double elapsed = std::max(std::chrono::duration<double>(now - start_).count(), 0.0);
  const auto done = static_cast<double>(done_);
  std::string text = options_.label.empty() ? std::string() : options_.label + ": ";
  const std::string rate = elapsed > 0 ? fmt::format("{:.1f} items/s", done / elapsed) : "? items/s";
  const std::string elapsed_text = format_progress_duration(elapsed);
  if (!total_) {
    text += fmt::format("{} | {} | {} elapsed", done_, rate, elapsed_text);
    return text;
  }
  const std::size_t total = *total_;
  const double fraction = total == 0 ? 1.0 : std::min(done / static_cast<double>(total), 1.0);
  const auto percent = static_cast<unsigned>(fraction * 100);
  const auto filled =
      std::min(static_cast<std::size_t>(fraction * static_cast<double>(options_.width)), options_.width);
  std::string eta = "--:--";
  if (done_ >= total) {
    eta = format_progress_duration(0);
  } else if (done_ > 0 && elapsed > 0) {
    eta = format_progress_duration(elapsed * static_cast<double>(total - done_) / done);
  }
  text += fmt::format("{:3}% [{}{}] {}/{} | {} | {} elapsed | ETA {}", percent, std::string(filled, '#'),
                      std::string(options_.width - filled, '-'), done_, total, rate, elapsed_text, eta);
  return text;
}

PROCPOOL_ENGINE_INLINE void ProgressState::write(std::string_view text) {
  if (options_.sink) {
    options_.sink(text);
  } else if (options_.output != nullptr) {
    // Errors are dropped: a progress bar must not fail the work it shows.
    std::fwrite(text.data(), 1, text.size(), options_.output);
    std::fflush(options_.output);
  }
}

PROCPOOL_ENGINE_INLINE ProgressState::ProgressState(ProgressBarOptions options) : options_(std::move(options)) {
  if (!options_.clock) options_.clock = [] { return std::chrono::steady_clock::now(); };
  start_ = options_.clock();
  const bool terminal = options_.output != nullptr && ::isatty(::fileno(options_.output)) == 1;
  switch (options_.draw) {
    case ProgressDraw::automatic:
      live_ = terminal;
      summary_ = !terminal && options_.summary_when_not_terminal;
      break;
    case ProgressDraw::always:
      live_ = true;
      break;
    case ProgressDraw::never:
      break;
  }
}

PROCPOOL_ENGINE_INLINE ProgressState::~ProgressState() {
  try {
    finish();
  } catch (...) {
  }
}

PROCPOOL_ENGINE_INLINE void ProgressState::update(std::size_t done, std::optional<std::size_t> total) {
  std::lock_guard lock(mutex_);
  if (finished_) return;
  done_ = done;
  total_ = total;
  updated_ = true;
  if (!live_) return;
  const TimePoint now = options_.clock();
  const bool complete = total && done >= *total;
  // Throttled: a chunk of results arriving every few microseconds would
  // otherwise spend the callback thread on the terminal. The final state is
  // drawn at once so a finished bar never shows a stale count.
  if (drawn_) {
    if (complete ? done == drawn_done_ : now - drawn_at_ < options_.min_interval) return;
  }
  draw(now, false);
}

PROCPOOL_ENGINE_INLINE void ProgressState::finish() {
  std::lock_guard lock(mutex_);
  if (finished_) return;
  finished_ = true;  // before writing: a sink that throws still finishes once
  if (!updated_) return;
  if (live_) {
    draw(options_.clock(), true);
  } else if (summary_) {
    write(render(options_.clock()) + '\n');
  }
}

PROCPOOL_ENGINE_INLINE std::string ProgressState::line() {
  std::lock_guard lock(mutex_);
  return render(options_.clock());
}

PROCPOOL_ENGINE_INLINE void ProgressState::print_above(std::string_view text) {
  std::lock_guard lock(mutex_);
  std::string out;
  if (live_ && drawn_ && !finished_) {
    // Over the bar's line (blanked to its end), then the bar again below.
    out = '\r' + std::string(text);
    const std::size_t columns = display_columns(text);
    if (columns < drawn_length_) out.append(drawn_length_ - columns, ' ');
    out += '\n';
    write(out);
    drawn_length_ = 0;
    draw(options_.clock(), false);
    return;
  }
  out = std::string(text) + '\n';
  write(out);
}

}  // namespace procpool::detail
#endif

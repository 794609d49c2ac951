// procpool - the parent's receiving end of one worker's result pipe: bytes
// in, whole frames out.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "protocol.hpp"

namespace procpool::detail {

/**
 * Buffers what a worker sent until frames are whole. Memory follows the bytes
 * that actually arrived, never the length a frame claims: a worker that
 * announces a 1 GiB frame and sends nothing more costs at most
 * `eager_bytes`, and a large frame's buffer then grows at most to twice what
 * has arrived. A large frame gets a buffer of its own, which the caller may
 * take over (take_large()) instead of copying the payload out.
 *
 * Use: read() into space(), commit() what was read, then call next() until it
 * stops returning Parse::complete. Not thread-safe.
 */
class Inbox {
 public:
  /// Bytes asked of each read() into the small buffer.
  static constexpr std::size_t read_size = std::size_t{64} << 10;
  /// Frames longer than this (header included) get a buffer of their own.
  static constexpr std::size_t large_frame = std::size_t{256} << 10;
  /// A large frame's buffer is sized up to this at once; beyond it, it grows
  /// with the bytes that arrive.
  static constexpr std::size_t eager_bytes = std::size_t{16} << 20;

  explicit Inbox(std::size_t max_payload = 0xffffffffu) : max_payload_(max_payload) {}

  /// Where the next read() should put its bytes; never empty.
  std::span<char> space() {
    if (large_total_ != 0) {
      if (large_filled_ == large_.size()) {
        large_.resize(std::min(large_total_, std::max(2 * large_filled_, eager_bytes)));
      }
      return {large_.data() + large_filled_, large_.size() - large_filled_};
    }
    if (begin_ == end_) begin_ = end_ = 0;
    if (small_.size() - end_ < read_size) {
      if (begin_ > 0) {
        std::memmove(small_.data(), small_.data() + begin_, end_ - begin_);
        end_ -= begin_;
        begin_ = 0;
      }
      if (small_.size() - end_ < read_size) small_.resize(end_ + read_size);
    }
    return {small_.data() + end_, small_.size() - end_};
  }

  /// `n` bytes were written at the front of space().
  void commit(std::size_t n) {
    if (large_total_ != 0) {
      large_filled_ += n;
    } else {
      end_ += n;
    }
  }

  /**
   * The next whole frame. Parse::too_large if its length is over the limit
   * (front_length() tells it); the inbox is then unusable until clear().
   * A frame stays valid until the next call of next(), space() or clear().
   */
  Parse next(FrameView& frame) {
    if (large_done_) {
      large_done_ = false;
      large_ = {};
    }
    if (large_total_ != 0) {
      if (large_filled_ < large_total_) return Parse::need_more;
      frame = {static_cast<FrameKind>(get<std::uint32_t>(large_.data() + 4)), large_.data() + frame_header_size,
               large_total_ - frame_header_size};
      large_total_ = large_filled_ = 0;
      large_done_ = true;
      return Parse::complete;
    }
    Parse parsed = parse_frame(small_.data() + begin_, end_ - begin_, max_payload_, frame);
    if (parsed == Parse::complete) {
      begin_ += frame_header_size + frame.size;
    } else if (parsed == Parse::need_more && end_ - begin_ >= frame_header_size) {
      std::size_t whole = frame_header_size + get<std::uint32_t>(small_.data() + begin_);
      if (whole > large_frame) {
        // The rest of this frame goes straight into a buffer of its own; the
        // bytes after it are read only once it is whole.
        large_total_ = whole;
        large_filled_ = end_ - begin_;
        large_.assign(small_.data() + begin_, small_.data() + end_);
        begin_ = end_ = 0;
      }
    }
    return parsed;
  }

  /// The buffer of the frame next() just returned, if it was a large one
  /// (the frame's data points into it); otherwise an empty vector.
  std::vector<char> take_large() {
    if (!large_done_) return {};
    large_done_ = false;
    return std::exchange(large_, {});
  }

  /// Whether part of a frame is buffered (after next() returned need_more).
  bool partial() const { return large_total_ != 0 || end_ != begin_; }

  /// The kind of the frame at the front, once its header is in.
  std::optional<std::uint32_t> front_kind() const {
    if (large_total_ != 0) return get<std::uint32_t>(large_.data() + 4);
    if (end_ - begin_ < frame_header_size) return std::nullopt;
    return get<std::uint32_t>(small_.data() + begin_ + 4);
  }

  /// The length claimed by the frame at the front (for Parse::too_large).
  std::uint32_t front_length() const { return end_ - begin_ >= 4 ? get<std::uint32_t>(small_.data() + begin_) : 0; }

  /// Drops everything buffered.
  void clear() {
    begin_ = end_ = large_total_ = large_filled_ = 0;
    large_done_ = false;
    large_ = {};
  }

 private:
  std::size_t max_payload_;
  std::vector<char> small_;
  std::size_t begin_ = 0, end_ = 0;
  std::vector<char> large_;
  std::size_t large_total_ = 0;   // whole length of the large frame being read, 0 if none
  std::size_t large_filled_ = 0;  // bytes of it in large_
  bool large_done_ = false;       // large_ holds the frame next() returned last
};

}  // namespace procpool::detail

// procpool - what the pool has still to write to one worker's task pipe:
// messages, each a small header of its own (a task header) and a frame it
// shares (a task frame, which may be sent to several workers in turn).
#pragma once

#include <sys/uio.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <deque>
#include <memory>
#include <utility>

#include "shm.hpp"
#include "system.hpp"

namespace procpool::detail {

class Outbox {
 public:
  /// Bytes a message's own header may hold.
  static constexpr std::size_t max_head = 24;

  /// Queues `frame`, led by the `head_size` bytes at `head` (none by default).
  void push(std::shared_ptr<const TaskBytes> frame, const char* head = nullptr, std::size_t head_size = 0) {
    Message message;
    message.head_size = static_cast<std::uint8_t>(std::min(head_size, max_head));
    if (head_size != 0) std::memcpy(message.head.data(), head, message.head_size);
    message.frame = std::move(frame);
    messages_.push_back(std::move(message));
  }

  bool empty() const noexcept { return messages_.empty(); }
  void clear() noexcept {
    messages_.clear();
    offset_ = 0;
  }

  /// What came of a flush().
  enum class Flushed { all, blocked, gone };

  /// Writes as much as the (non-blocking) fd takes. `gone`: the reader is
  /// gone (EPIPE); what was queued is dropped.
  Flushed flush(int fd) {
    while (!messages_.empty()) {
      iovec iov[64];
      int n = 0;
      std::size_t skip = offset_;  // of the front message, head first
      for (auto it = messages_.begin(); it != messages_.end() && n < 63; ++it) {
        const std::size_t head = it->head_size;
        if (skip < head) iov[n++] = {it->head.data() + skip, head - skip};
        const std::size_t frame_skip = skip > head ? skip - head : 0;
        if (it->frame && frame_skip < it->frame->size()) {
          iov[n++] = {const_cast<char*>(it->frame->data()) + frame_skip, it->frame->size() - frame_skip};
        }
        skip = 0;
      }
      ssize_t written = retry_eintr([&] { return ::writev(fd, iov, n); });
      if (written < 0) {
        if (errno == EAGAIN) return Flushed::blocked;
        clear();
        return Flushed::gone;
      }
      auto left = static_cast<std::size_t>(written);
      while (left > 0) {
        const std::size_t rest = size(messages_.front()) - offset_;
        if (left >= rest) {
          left -= rest;
          messages_.pop_front();
          offset_ = 0;
        } else {
          offset_ += left;
          left = 0;
        }
      }
    }
    return Flushed::all;
  }

 private:
  struct Message {
    std::array<char, max_head> head;
    std::uint8_t head_size = 0;
    std::shared_ptr<const TaskBytes> frame;
  };
  static std::size_t size(const Message& m) { return m.head_size + (m.frame ? m.frame->size() : 0); }

  std::deque<Message> messages_;
  std::size_t offset_ = 0;  // bytes of the front message already written
};

}  // namespace procpool::detail

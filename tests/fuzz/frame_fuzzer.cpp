// libFuzzer target for procpool's frame decoding: everything the parent does
// with bytes a worker sent, plus the worker's blocking FrameReader.
//
//   (a) detail::Inbox, the dispatcher's own buffering, fed the input in
//       pieces of several sizes, frame after frame, under a few payload limits;
//       and the dispatcher's own reader (detail::ResultReader) reading the
//       input from a Link in such pieces, for a worker holding tasks 0..3,
//       each outcome it delivers decoded as in (b);
//   (b) each complete result frame's payload through detail::decode_chunk<T>
//       (T = long, std::string, std::vector<std::string>) with a small item
//       count (init_failed and fatal frames go through the reader in (a));
//   (c) detail::FrameReader over a memfd holding the input, and over a
//       SOCK_SEQPACKET socket fed in small packets, so every read returns a
//       piece of a frame and the reader's buffering is exercised;
//   (d) detail::ShmReader, both kinds (a worker's announced result buffers,
//       and buffers mapped on first sight), fed shm_announce, shm_ref and
//       shm_drop payloads drawn from the input. They name this process's own
//       procpool buffers, which hold the input's bytes (so a reference may
//       point at any frame, consistent or not), or not; a result frame a
//       reference resolves to is decoded as in (b).
//
// Nothing here may crash, leak, or allocate much more than the input.
// Build: scripts/fuzz.sh (clang, -DPROCPOOL_BUILD_FUZZERS=ON).
//
// PROCPOOL_FUZZ_DECODE=0 in the environment skips every cereal decode (the
// payloads of result, init_failed and fatal frames): a way to keep fuzzing
// the framing alone while a finding in the payload decoding is open.
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <procpool/detail/inbox.hpp>
#include <procpool/detail/job.hpp>
#include <procpool/detail/protocol.hpp>
#include <procpool/detail/result_reader.hpp>
#include <procpool/detail/shm.hpp>
#include <procpool/detail/worker.hpp>

namespace {

using namespace procpool::detail;

bool decode_payloads() {
  static const bool value = [] {
    const char* text = std::getenv("PROCPOOL_FUZZ_DECODE");
    return text == nullptr || std::string(text) != "0";
  }();
  return value;
}

/// Touches a value so the decode is not optimized away.
volatile std::size_t sink = 0;

template <class T>
void decode_as(std::span<const char> items, std::size_t count) {
  ChunkOutcome outcome;
  outcome.payload.assign(items.begin(), items.end());
  outcome.pid = 1234;
  outcome.worker = 0;
  try {
    // Odd counts also raise known exception types as themselves (RemoteError::original).
    decode_chunk<T>(
        outcome, "imap", count % 2 == 1, 0, count,
        [](std::size_t index, T&& value) {
          if constexpr (std::is_same_v<T, long>) {
            sink = sink + index + static_cast<std::size_t>(value);
          } else {
            sink = sink + index + value.size();
          }
        },
        [](std::size_t index, std::exception_ptr error) {
          try {
            std::rethrow_exception(error);
          } catch (const std::exception& e) {
            sink = sink + index + std::string(e.what()).size();
          }
        });
  } catch (const std::exception&) {
    // decode_chunk reports bad payloads through on_error; anything it lets
    // escape is still an exception, not a crash.
  }
}

/// What the dispatcher does with a frame it parsed.
void handle_frame(const FrameView& frame) {
  if (!decode_payloads()) return;
  switch (frame.kind) {
    case FrameKind::result: {
      ResultHead head;
      std::span<const char> items;
      if (!ResultHead::decode(frame, head, items)) return;  // the dispatcher calls this a protocol violation
      // A small item count, from the task id's low bits (the corpus sets them).
      const std::size_t count = 1 + (head.task_id & 3u);
      decode_as<long>(items, count);
      decode_as<std::string>(items, count);
      decode_as<std::vector<std::string>>(items, count);
      return;
    }
    default:
      return;
  }
}

/// (a) + (b): the dispatcher's detail::Inbox fed the input in pieces of
/// `piece` bytes (as read() returns them), every whole frame handled as the
/// dispatcher does; a large frame's buffer is taken over on every other one.
void parse_all(const char* data, std::size_t size, std::size_t max_payload, std::size_t piece) {
  Inbox inbox(max_payload);
  std::size_t at = 0;
  bool take = false;
  while (at < size) {
    std::span<char> space = inbox.space();
    if (space.empty()) __builtin_trap();  // space() promises room
    std::size_t n = std::min({piece, space.size(), size - at});
    std::memcpy(space.data(), data + at, n);
    at += n;
    inbox.commit(n);
    for (;;) {
      FrameView frame{};
      Parse parsed = inbox.next(frame);
      if (parsed == Parse::too_large) return;  // the dispatcher kills the worker here
      if (parsed == Parse::need_more) break;
      handle_frame(frame);
      if ((take = !take)) {
        std::vector<char> owned = inbox.take_large();
        if (!owned.empty() && (frame.data < owned.data() || frame.data + frame.size > owned.data() + owned.size())) {
          __builtin_trap();  // take_large() hands over the buffer the frame lies in
        }
      }
    }
  }
}

/// (c) FrameReader over an fd; it owns nothing, the caller closes the fd.
void read_all(int fd, std::size_t max_payload) {
  FrameReader reader(fd, max_payload);
  FrameView frame{};
  try {
    while (reader.next(frame)) sink = sink + frame.size + static_cast<std::size_t>(frame.kind);
  } catch (const std::exception&) {
    // truncated or oversized frame: the worker turns this into exit_protocol_error
  }
}

void read_from_memfd(const std::uint8_t* data, std::size_t size, std::size_t max_payload) {
  int fd = ::memfd_create("procpool-fuzz", MFD_CLOEXEC);
  if (fd < 0) return;
  std::size_t done = 0;
  while (done < size) {
    ssize_t n = ::write(fd, data + done, size - done);
    if (n <= 0) break;
    done += static_cast<std::size_t>(n);
  }
  if (done == size && ::lseek(fd, 0, SEEK_SET) == 0) read_all(fd, max_payload);
  ::close(fd);
}

/// Each packet of a SOCK_SEQPACKET socket is returned by one read(), so the
/// reader sees the input in exactly these pieces, deterministically.
void read_from_packets(const std::uint8_t* data, std::size_t size, std::size_t max_payload) {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) != 0) return;
  const std::size_t piece = std::max<std::size_t>(size / 64 + 1, size == 0 ? 1 : 1 + data[0] % 13);
  for (std::size_t at = 0; at < size; at += piece) {
    std::size_t n = std::min(piece, size - at);
    // A full socket buffer just makes the input shorter.
    if (::send(fds[1], data + at, n, MSG_DONTWAIT | MSG_NOSIGNAL) != static_cast<ssize_t>(n)) break;
  }
  ::shutdown(fds[1], SHUT_WR);
  read_all(fds[0], max_payload);
  ::close(fds[0]);
  ::close(fds[1]);
}

/// Reads fields off the input; zeros once it runs out.
class Cursor {
 public:
  Cursor(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  template <class T>
  T next() {
    T value{};
    const std::size_t n = std::min(sizeof(T), size_ - at_);
    std::memcpy(&value, data_ + at_, n);
    at_ += n;
    return value;
  }
  bool done() const { return at_ == size_; }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t at_ = 0;
};

/// Two buffers of this process's own, as a worker's result buffers are.
std::unique_ptr<ShmBuffer>& shm_buffer(int which) {
  static std::unique_ptr<ShmBuffer> small = create_shm_buffer("procpool-fuzz", 256);
  static std::unique_ptr<ShmBuffer> large = create_shm_buffer("procpool-fuzz", 4096);
  return which == 0 ? small : large;
}

/// (d): up to 16 operations, each a byte saying what (announce, refer, drop),
/// which buffer (either of ours, a mix of the two, or raw fd and id), which
/// reader, which pid and whether the reference's size matches the frame in
/// the buffer; then the raw fields. The buffers hold the input from byte 48.
void resolve_references(const std::uint8_t* data, std::size_t size) {
  const std::size_t from = std::min<std::size_t>(size, 48);
  for (int which : {0, 1}) {
    ShmBuffer& buffer = *shm_buffer(which);
    const std::size_t n = std::min(buffer.mapping.capacity(), size - from);
    std::memset(buffer.mapping.data(), 0, buffer.mapping.capacity());
    std::memcpy(buffer.mapping.data(), data + from, n);
  }
  ShmReader announced(true), first_sight(false);
  Cursor in(data, from);
  const pid_t self = ::getpid();
  for (int op = 0; op < 16 && !in.done(); ++op) {
    const auto what = in.next<std::uint8_t>();
    const int target = (what >> 2) & 3;
    std::int32_t fd = 0;
    std::uint64_t id = 0;
    if (target < 2) {
      fd = shm_buffer(target)->fd.get();
      id = shm_buffer(target)->id;
    } else if (target == 2) {
      fd = in.next<std::int32_t>();
      id = in.next<std::uint64_t>();
    } else {
      fd = shm_buffer(0)->fd.get();
      id = shm_buffer(1)->id;  // the fd of one, the id of the other
    }
    static constexpr std::int32_t other_pids[] = {0, -1, 1};
    const std::int32_t pid = (what & 0x40) == 0 ? self : other_pids[in.next<std::uint8_t>() % 3];
    ShmReader& reader = (what & 0x20) != 0 ? announced : first_sight;
    char payload[ShmLocation::encoded_size] = {};
    std::memcpy(payload, &pid, 4);
    std::memcpy(payload + 4, &fd, 4);
    std::memcpy(payload + 8, &id, 8);
    switch (what % 3) {
      case 0:
        sink = sink + reader.adopt(FrameView{FrameKind::shm_announce, payload, ShmAnnounce::encoded_size}, self);
        break;
      case 1: {
        // The size of the frame the buffer holds, as an honest writer says, or a raw one.
        std::uint64_t frame_size =
            (what & 0x10) != 0
                ? in.next<std::uint64_t>()
                : std::uint64_t{get<std::uint32_t>(shm_buffer(target & 1)->mapping.data())} + frame_header_size;
        std::memcpy(payload + 16, &frame_size, 8);
        const std::size_t max_payload = (what & 0x80) != 0 ? 16 : std::size_t{1} << 20;
        try {
          auto resolved =
              reader.resolve(FrameView{FrameKind::shm_ref, payload, ShmLocation::encoded_size}, max_payload);
          if (resolved.frame.kind == FrameKind::result) handle_frame(resolved.frame);
          sink = sink + resolved.frame.size;
        } catch (const std::exception&) {
          // the dispatcher calls this a protocol violation
        }
        break;
      }
      default:
        reader.forget(FrameView{FrameKind::shm_drop, payload + 8, 8});
        break;
    }
  }
}

}  // namespace

/// A worker's Link that receives the input in pieces of `piece` bytes.
class InputLink final : public Link {
 public:
  InputLink(const char* data, std::size_t size, std::size_t piece) : data_(data), size_(size), piece_(piece) {}
  pid_t pid() const noexcept override { return 4242; }
  void send(std::shared_ptr<const TaskBytes>, std::span<const char>) override {}
  bool has_unsent() const noexcept override { return false; }
  void flush() noexcept override {}
  bool sending() const noexcept override { return true; }
  void close_sending() noexcept override {}
  long receive(std::span<char> space) noexcept override {
    const std::size_t n = std::min({piece_, space.size(), size_ - at_});
    std::memcpy(space.data(), data_ + at_, n);
    at_ += n;
    return static_cast<long>(n);
  }
  int receive_fd() const noexcept override { return -1; }
  int send_fd() const noexcept override { return -1; }
  int end_fd() const noexcept override { return -1; }
  void kill(int) noexcept override {}
  std::optional<int> try_reap() override { return 0; }
  int reap() override { return 0; }

 private:
  const char* data_;
  std::size_t size_;
  std::size_t piece_;
  std::size_t at_ = 0;
};

/// (a) + (b) through the dispatcher's own reader: a worker holding tasks
/// 0..3 (four of each, of 1 to 4 items) sends the input; every outcome the
/// reader delivers is decoded as the caller would.
void read_as_dispatcher(const char* data, std::size_t size, std::size_t max_payload, std::size_t piece) {
  Worker w;
  w.link = std::make_unique<InputLink>(data, size, piece);
  w.inbox = Inbox(max_payload);
  auto job = std::make_shared<JobState>("imap");
  for (std::uint64_t k = 0; k < 16; ++k) {
    Task task;
    task.job = job;
    task.chunk = k;
    task.id = k % 4;
    task.frame = std::make_shared<TaskBytes>();
    const std::size_t start = begin_task_frame(*task.frame, 0);
    finish_task_frame(*task.frame, start, static_cast<std::uint32_t>(1 + (k % 4)));
    w.held.push_back(std::move(task));
  }
  RunTimeEstimate task_time{0.2};
  const bool timeouts_used = false;
  ResultReader reader(max_payload, 0, task_time, timeouts_used);
  std::vector<Delivery> deliveries;
  reader.read(w, deliveries);
  if (!decode_payloads()) return;
  for (auto& delivery : deliveries) {
    try {
      decode_chunk<long>(
          delivery.outcome, "imap", false, 0, delivery.items,
          [](std::size_t index, long&& value) { sink = sink + index + static_cast<std::size_t>(value); },
          [](std::size_t index, std::exception_ptr) { sink = sink + index; });
    } catch (const std::exception&) {
      // As in decode_as: an exception, not a crash.
    }
  }
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const char* bytes = reinterpret_cast<const char*>(data);
  // The dispatcher's limit is Options::max_message_bytes (1 GiB by default);
  // a small one here keeps the fuzzer within its memory limit, and a tiny
  // one, chosen by the input, reaches the "too large" path.
  constexpr std::size_t max_payload = std::size_t{1} << 20;
  parse_all(bytes, size, max_payload, Inbox::read_size);
  if (size > 0) parse_all(bytes, size, data[size - 1], 1 + data[0] % 7);
  read_as_dispatcher(bytes, size, max_payload, Inbox::read_size);
  if (size > 0) read_as_dispatcher(bytes, size, data[size - 1], 1 + data[0] % 7);
  read_from_memfd(data, size, max_payload);
  read_from_packets(data, size, max_payload);
  resolve_references(data, size);
  return 0;
}

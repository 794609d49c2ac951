// The wire layer on its own: the parent's Inbox (bytes in, whole frames out,
// memory bounded by what arrived) and the archives' refusal of length
// prefixes that cannot be true; then the same refusal end to end.
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"

namespace {

using procpool::detail::FrameKind;
using procpool::detail::FrameView;
using procpool::detail::Inbox;
using procpool::detail::Parse;

std::vector<char> frame_of(FrameKind kind, const std::string& payload) {
  std::vector<char> out;
  std::size_t start = procpool::detail::begin_frame(out, kind);
  out.insert(out.end(), payload.begin(), payload.end());
  procpool::detail::finish_frame(out, start);
  return out;
}

/// Feeds `bytes` to the inbox `piece` bytes at a time; returns the payloads of the frames it yields.
std::vector<std::string> feed(Inbox& inbox, const std::vector<char>& bytes, std::size_t piece) {
  std::vector<std::string> frames;
  for (std::size_t at = 0; at < bytes.size();) {
    auto space = inbox.space();
    REQUIRE(!space.empty());
    std::size_t n = std::min({piece, space.size(), bytes.size() - at});
    std::memcpy(space.data(), bytes.data() + at, n);
    inbox.commit(n);
    at += n;
    FrameView frame{};
    while (inbox.next(frame) == Parse::complete) frames.emplace_back(frame.data, frame.size);
  }
  return frames;
}

/// A value whose encoding claims a string of 2^40 bytes and holds none.
struct Liar {
  template <class Archive>
  void save(Archive& ar) const {
    ar(cereal::make_size_tag(static_cast<cereal::size_type>(std::uint64_t{1} << 40)));
  }
  template <class Archive>
  void load(Archive& ar) {
    std::string s;
    ar(s);
  }
};

Liar lie(long) { return {}; }
long twice(long x) { return 2 * x; }

struct Empty {
  template <class Archive>
  void serialize(Archive&) {}
};

}  // namespace

TEST_CASE("the inbox yields whole frames whatever pieces the bytes come in", "[wire]") {
  std::vector<char> bytes;
  std::vector<std::string> sent;
  for (std::size_t size : {0u, 1u, 7u, 300u, 70000u, 300000u, 5u, 3000000u, 12u}) {
    sent.push_back(std::string(size, static_cast<char>('a' + size % 26)));
    auto f = frame_of(FrameKind::result, sent.back());
    bytes.insert(bytes.end(), f.begin(), f.end());
  }
  for (std::size_t piece : {std::size_t{1} << 20, std::size_t{65536}, std::size_t{4093}}) {
    CAPTURE(piece);
    Inbox inbox;
    CHECK(feed(inbox, bytes, piece) == sent);
  }
  Inbox inbox;
  CHECK(feed(inbox, std::vector<char>(bytes.begin(), bytes.begin() + 2000), 1) ==
        std::vector<std::string>(sent.begin(), sent.begin() + 4));
}

TEST_CASE("a frame that claims a huge length costs only what arrived", "[wire]") {
  Inbox inbox;
  std::vector<char> header;
  procpool::detail::put<std::uint32_t>(header, 0xF0000000u);  // 3.75 GiB claimed
  procpool::detail::put<std::uint32_t>(header, static_cast<std::uint32_t>(FrameKind::result));
  header.resize(100, 'x');
  CHECK(feed(inbox, header, header.size()).empty());
  // The buffer it offers for the rest is bounded, not the claimed length.
  CHECK(inbox.space().size() <= Inbox::eager_bytes);
  // And grows with the bytes, at most to twice what has arrived.
  std::vector<char> more(Inbox::eager_bytes, 'y');
  CHECK(feed(inbox, more, Inbox::read_size).empty());
  CHECK(inbox.space().size() <= 2 * Inbox::eager_bytes);
}

TEST_CASE("a frame over the limit is refused before it is buffered", "[wire]") {
  Inbox inbox(1000);
  auto f = frame_of(FrameKind::result, std::string(1001, 'z'));
  auto space = inbox.space();
  std::memcpy(space.data(), f.data(), 16);
  inbox.commit(16);
  FrameView frame{};
  CHECK(inbox.next(frame) == Parse::too_large);
  CHECK(inbox.front_length() == 1001);
}

TEST_CASE("a large frame's buffer is handed over, not copied", "[wire]") {
  Inbox inbox;
  auto f = frame_of(FrameKind::result, std::string(Inbox::large_frame * 2, 'q'));
  auto small = frame_of(FrameKind::ready, "after");
  f.insert(f.end(), small.begin(), small.end());
  std::size_t at = 0;
  FrameView frame{};
  Parse parsed = Parse::need_more;
  while (parsed != Parse::complete) {
    auto space = inbox.space();
    std::size_t n = std::min(space.size(), f.size() - at);
    std::memcpy(space.data(), f.data() + at, n);
    inbox.commit(n);
    at += n;
    parsed = inbox.next(frame);
  }
  CHECK(frame.size == Inbox::large_frame * 2);
  std::vector<char> owned = inbox.take_large();
  REQUIRE(!owned.empty());
  CHECK(frame.data == owned.data() + procpool::detail::frame_header_size);
  // The bytes after the large frame were not read into it: they come next.
  std::vector<char> rest(f.begin() + static_cast<std::ptrdiff_t>(at), f.end());
  CHECK(feed(inbox, rest, rest.size()) == std::vector<std::string>{"after"});
}

TEST_CASE("the archives refuse a length prefix longer than the bytes left", "[wire]") {
  std::vector<char> bytes;
  {
    procpool::detail::Encoder encoder(bytes);
    encoder(Liar{});
  }
  procpool::detail::Decoder decoder(bytes.data(), bytes.size());
  Liar liar;
  try {
    decoder(liar);
    FAIL("decoded a string of 2^40 bytes from 8");
  } catch (const cereal::Exception& e) {
    CHECK_THAT(e.what(), Catch::Contains("corrupt message"));
  }
}

TEST_CASE("the archives round-trip what cereal's binary archives do", "[wire]") {
  std::vector<char> bytes;
  std::map<std::string, std::vector<double>> m{{"a", {1.5, 2.5}}, {"b", {}}};
  std::vector<Empty> empties(1000);  // no bytes at all: allowed, within bounds
  std::tuple<int, std::optional<std::string>, std::variant<long, std::string>> t{7, "x", std::string("v")};
  {
    procpool::detail::Encoder encoder(bytes);
    encoder(m, empties, t, std::u32string(U"wide"));
  }
  procpool::detail::Decoder decoder(bytes.data(), bytes.size());
  decltype(m) m2;
  std::vector<Empty> empties2;
  decltype(t) t2;
  std::u32string wide;
  decoder(m2, empties2, t2, wide);
  CHECK(m2 == m);
  CHECK(empties2.size() == 1000);
  CHECK(t2 == t);
  CHECK(wide == U"wide");
  CHECK(decoder.remaining() == 0);
}

TEST_CASE("byte strings and byte vectors decode straight from the message, bounded by it", "[wire]") {
  std::vector<char> bytes;
  const std::vector<unsigned char> u{1, 2, 255};
  const std::vector<signed char> sc{-1, 0, 1};
  const std::vector<char> empty;
  {
    procpool::detail::Encoder encoder(bytes);
    encoder(std::string("hello"), u, sc, empty, std::string());
  }
  procpool::detail::Decoder decoder(bytes.data(), bytes.size());
  std::string hello, nothing = "not cleared";
  std::vector<unsigned char> u2;
  std::vector<signed char> sc2;
  std::vector<char> empty2{'x'};
  decoder(hello, u2, sc2, empty2, nothing);
  CHECK(hello == "hello");
  CHECK(u2 == u);
  CHECK(sc2 == sc);
  CHECK(empty2.empty());
  CHECK(nothing.empty());
  CHECK(decoder.remaining() == 0);
  // A length that passes the prefix check but runs past the end is refused.
  std::vector<char> short_message(8 + 10, 'z');
  const std::uint64_t claimed = 100;
  std::memcpy(short_message.data(), &claimed, sizeof(claimed));
  for (int kind = 0; kind < 2; ++kind) {
    procpool::detail::Decoder truncated(short_message.data(), short_message.size());
    std::string s;
    std::vector<char> v;
    try {
      if (kind == 0) truncated(s);
      if (kind == 1) truncated(v);
      FAIL("decoded 100 bytes from 10");
    } catch (const cereal::Exception& e) {
      CHECK_THAT(e.what(), Catch::Contains("message truncated"));
    }
  }
}

POOL_TEST("a result that claims more than it holds is a ProtocolError, not an allocation", "[wire][faults]") {
  procpool::Pool pool(test::options<TestType>());
  auto error = test::thrown<procpool::ProtocolError>([&] { pool.apply<lie>(1L); });
  CHECK_THAT(error.what(), Catch::Contains("corrupt message"));
  CHECK(pool.map<twice>(std::vector<long>{1, 2}) == std::vector<long>{2, 4});
}

TEST_CASE("a worker out of short tasks looks for the next before sleeping, and less often after empty looks",
          "[wire]") {
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  procpool::detail::Fd read_end(fds[0]), write_end(fds[1]);
  procpool::detail::FrameReader reader(read_end.get(), 1 << 20);
  auto send = [&](const std::string& payload) {
    auto bytes = frame_of(FrameKind::task, payload);
    REQUIRE(::write(write_end.get(), bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  };
  // Sends a frame long after the reader runs out: any look it makes finds
  // nothing (50 ms: a look is far shorter, even under ThreadSanitizer on a
  // loaded machine, where 5 ms was not always enough).
  auto next_late = [&](const std::string& payload) {
    std::thread late([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      send(payload);
    });
    FrameView frame{};
    const bool got = reader.next(frame);
    late.join();
    REQUIRE(got);
    CHECK(std::string(frame.data, frame.size) == payload);
  };
  auto next_ready = [&](const std::string& payload) {
    send(payload);
    FrameView frame{};
    REQUIRE(reader.next(frame));
    CHECK(std::string(frame.data, frame.size) == payload);
  };

  next_late("not asked to look");
  CHECK(reader.spin_misses() == 0);
  reader.spin_when_idle(true);
  next_late("one empty look");
  CHECK(reader.spin_misses() == 1);
  next_late("slept through at once");  // one idle moment skipped after one empty look
  CHECK(reader.spin_misses() == 1);
  next_late("another empty look");
  CHECK(reader.spin_misses() == 2);
  for (const char* skipped : {"skip 1", "skip 2", "skip 3"}) next_ready(skipped);  // three skipped now
  CHECK(reader.spin_misses() == 2);
  next_ready("found at once");
  CHECK(reader.spin_misses() == 0);
  // EOF ends a look as data does.
  write_end.reset();
  FrameView frame{};
  CHECK_FALSE(reader.next(frame));
  CHECK(reader.spin_misses() == 0);
}

TEST_CASE("a chunk of 2^31 items or more is refused", "[wire]") {
  std::vector<char> frame;
  const std::size_t start = procpool::detail::begin_task_frame(frame, 1);
  CHECK_THROWS_AS(procpool::detail::finish_task_frame(frame, start, procpool::detail::max_chunk_items + 1U),
                  std::length_error);
}

namespace {
/// Counts the allocations of the vectors using it.
template <class T>
struct CountingAllocator {
  using value_type = T;
  std::size_t* count;
  explicit CountingAllocator(std::size_t* c) : count(c) {}
  template <class U>
  CountingAllocator(const CountingAllocator<U>& other) : count(other.count) {}  // NOLINT: rebinding
  T* allocate(std::size_t n) {
    ++*count;
    return std::allocator<T>().allocate(n);
  }
  void deallocate(T* p, std::size_t n) noexcept { std::allocator<T>().deallocate(p, n); }
  template <class U>
  bool operator==(const CountingAllocator<U>& other) const {
    return count == other.count;
  }
};
}  // namespace

TEST_CASE("a task frame of a few small items is encoded in one allocation", "[wire]") {
  std::size_t allocations = 0;
  std::vector<char, CountingAllocator<char>> frame{CountingAllocator<char>(&allocations)};
  const std::size_t start = procpool::detail::begin_task_frame(frame, 1);
  for (long item = 0; item < 4; ++item) procpool::detail::put<long>(frame, item);
  procpool::detail::finish_task_frame(frame, start, 4);
  CHECK(frame.size() == procpool::detail::task_prefix_size + 4 * sizeof(long));
  CHECK(allocations == 1);
}

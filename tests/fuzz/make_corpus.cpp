// Writes the frame fuzzer's seed corpus: valid worker->parent messages (and
// a few broken ones) built with procpool's own encoders, one file each.
// Usage: procpool_frame_corpus <directory>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <procpool/detail/protocol.hpp>
#include <procpool/detail/serialize.hpp>

namespace {

using namespace procpool::detail;
using Bytes = std::vector<char>;

/// A result frame: task id (its low 2 bits + 1 are the fuzzer's item count),
/// run time, then whatever `items` encodes.
template <class Items>
Bytes result(std::uint64_t task_id, Items&& items) {
  Bytes out;
  std::size_t start = ResultHead::begin(out, task_id);
  ResultHead::set_run_time(out, start, 12345);
  {
    Encoder encoder(out);
    items(encoder);
  }
  finish_frame(out, start);
  return out;
}

Bytes failure(FrameKind kind, const std::string& type, const std::string& message) {
  Bytes out;
  std::size_t start = begin_frame(out, kind);
  {
    Encoder encoder(out);
    encoder(type, message);
  }
  finish_frame(out, start);
  return out;
}

Bytes simple(FrameKind kind) {
  Bytes out;
  if (kind == FrameKind::ready) {
    ReadyMessage{.pid = 4242, .shm = false, .claims = false}.encode(out);
  } else {
    encode_empty(out, kind);
  }
  return out;
}

Bytes cat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const Bytes& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus directory>\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  auto write = [&](const std::string& name, const Bytes& bytes) {
    std::ofstream(dir + "/" + name, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  };

  // Task id low bits: 0 -> 1 item, 1 -> 2 items, 2 -> 3 items, 3 -> 4 items.
  Bytes longs = result(2, [](Encoder& e) {
    e(true, 7L, true, -1L, false, std::string("std::runtime_error"), std::string("boom"));
  });
  Bytes strings = result(1, [](Encoder& e) { e(true, std::string("hello"), true, std::string(300, 'x')); });
  Bytes vectors = result(0, [](Encoder& e) { e(true, std::vector<std::string>{"a", "bc", ""}); });
  Bytes protocol = result(0, [](Encoder& e) {
    e(outcome_byte(ItemOutcome::unsent), std::string("the result message is larger than max_message_bytes"));
  });
  Bytes errors = result(3, [](Encoder& e) {
    for (int i = 0; i < 4; ++i)
      e(false, std::string("std::invalid_argument"), std::string("item ") + std::to_string(i));
  });
  write("result-longs", longs);
  write("result-strings", strings);
  write("result-vector-of-strings", vectors);
  write("result-protocol-error", protocol);
  write("result-errors", errors);
  write("result-empty-payload", result(0, [](Encoder&) {}));
  write("ready", simple(FrameKind::ready));
  write("leaving", simple(FrameKind::leaving));
  write("init-failed", failure(FrameKind::init_failed, "std::runtime_error", "no model file"));
  write("fatal", failure(FrameKind::fatal, "procpool::ProtocolError", "unexpected frame kind"));
  write("session", cat({simple(FrameKind::ready), longs, strings, vectors, simple(FrameKind::leaving)}));
  Bytes truncated = cat({simple(FrameKind::ready), longs});
  truncated.resize(truncated.size() - 5);
  write("truncated", truncated);
  Bytes oversized;
  put<std::uint32_t>(oversized, 0x7fffffffu);
  put<std::uint32_t>(oversized, static_cast<std::uint32_t>(FrameKind::result));
  write("oversized-header", oversized);
  return 0;
}

// The transport's promises: one pipe pair per worker and nothing else of
// the parent's, close-on-exec everywhere, bounded messages.
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <ranges>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "common.hpp"

namespace {

/// What process `pid` ("self": this one) has open beyond stdin/stdout/stderr:
/// "pipe:[...]", "socket:[...]", paths.
std::vector<std::string> fds_beyond_stdio_of(const std::string& pid) {
  std::vector<std::string> targets;
  const std::string path = "/proc/" + pid + "/fd";
  if (DIR* dir = ::opendir(path.c_str())) {
    const int own = pid == "self" ? ::dirfd(dir) : -1;
    while (dirent* entry = ::readdir(dir)) {
      if (entry->d_name[0] == '.') continue;
      int fd = std::stoi(entry->d_name);
      if (fd <= 2 || fd == own) continue;
      char target[PATH_MAX] = {};
      std::string link = path + "/" + entry->d_name;
      if (::readlink(link.c_str(), target, sizeof(target) - 1) > 0) targets.push_back(target);
    }
    ::closedir(dir);
  }
  return targets;
}

/// What the worker has open beyond stdin/stdout/stderr.
std::vector<std::string> open_fds_beyond_stdio(int) { return fds_beyond_stdio_of("self"); }

std::size_t count_pipes(const std::vector<std::string>& targets) {
  std::size_t pipes = 0;
  for (const auto& t : targets) pipes += t.rfind("pipe:", 0) == 0;
  return pipes;
}

std::string echo(std::string s) { return s; }

}  // namespace

POOL_TEST("a worker holds its own two pipe ends and none of its siblings'", "[transport]") {
  // What the program had open before: a fork worker inherits that, as it should.
  auto inherited = open_fds_beyond_stdio(0);
  // Two pools, so a worker of the second could inherit the first pool's pipes too.
  procpool::Pool first(test::options<TestType>({.processes = 3}));
  procpool::Pool second(test::options<TestType>({.processes = 3}));
  CHECK(first.apply<echo>(std::string("warm")) == "warm");
  for (procpool::Pool* pool : {&first, &second}) {
    for (auto fds : pool->map<open_fds_beyond_stdio>(std::vector<int>(12, 0), 1)) {
      std::erase_if(fds, [&](const std::string& t) { return std::count(inherited.begin(), inherited.end(), t) > 0; });
      INFO(fmt::format("{}", fmt::join(fds, ", ")));
      CHECK(fds.size() == 2);
      CHECK(count_pipes(fds) == 2);
    }
  }
}

POOL_TEST("every fd the pool opens in the parent is close-on-exec", "[transport]") {
  std::vector<int> before;
  for (int fd = 3; fd < 1024; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1) before.push_back(fd);
  }
  procpool::Pool pool(test::options<TestType>());
  CHECK(pool.apply<echo>(std::string("x")) == "x");
  for (int fd = 3; fd < 1024; ++fd) {
    int flags = ::fcntl(fd, F_GETFD);
    if (flags == -1 || std::find(before.begin(), before.end(), fd) != before.end()) continue;
    INFO("fd " << fd);
    CHECK((flags & FD_CLOEXEC) != 0);
  }
}

POOL_TEST("a message over max_message_bytes fails its task, not the pool", "[transport]") {
  procpool::Pool pool(test::options<TestType>({.max_message_bytes = 4096}));
  // Too large to send: fails before it leaves the parent.
  auto big_argument = test::thrown<procpool::ProtocolError>([&] { pool.apply<echo>(std::string(10000, 'a')); });
  CHECK_THAT(big_argument.what(), Catch::Contains("max_message_bytes (4096)"));
  CHECK_THAT(big_argument.what(), !Catch::Contains("pid 0"));  // it reached no worker
  // Too large a result: the worker reports it instead of sending it.
  auto big_result = test::thrown<procpool::ProtocolError>(
      [&] { pool.apply([](int n) { return std::string(static_cast<std::size_t>(n), 'b'); }, 10000); });
  CHECK_THAT(big_result.what(), Catch::Contains("max_message_bytes (4096)"));
  // And the pool goes on.
  CHECK(pool.apply<echo>(std::string("fine")) == "fine");
}

POOL_TEST("payloads of several megabytes travel intact both ways", "[transport]") {
  procpool::Pool pool(test::options<TestType>());
  std::vector<std::string> blobs;
  for (char c : {'a', 'b', 'c', 'd'}) blobs.push_back(std::string(3 << 20, c));
  auto back = pool.map<echo>(blobs, 1);
  CHECK(back == blobs);
}

// ---- large messages through shared memory -----------------------------------

namespace {

/// Mappings of this process whose memfd is called `name` (procpool-task: the
/// pool's task buffers; procpool-result: a worker's result buffers).
std::size_t memfd_mappings(const std::string& name) {
  std::ifstream maps("/proc/self/maps");
  std::size_t count = 0;
  for (std::string line; std::getline(maps, line);) {
    count += line.find("/memfd:" + name + " ") != std::string::npos ? 1 : 0;
  }
  return count;
}

/// In the worker: its buffers of either kind, after echoing `s`.
struct Seen {
  std::string echoed;
  std::size_t task_mappings = 0;
  std::size_t result_mappings = 0;
  template <class A>
  void serialize(A& ar) {
    ar(echoed, task_mappings, result_mappings);
  }
};
Seen echo_and_look(std::string s) {
  return {std::move(s), memfd_mappings("procpool-task"), memfd_mappings("procpool-result")};
}

std::string big(std::size_t size, char fill) {
  std::string s(size, fill);
  for (std::size_t i = 0; i < size; i += 4096) s[i] = static_cast<char>('a' + (i / 4096) % 26);
  return s;
}

}  // namespace

POOL_TEST("a message over shared_memory_threshold goes through shared memory, a smaller one through the pipe",
          "[transport][shm]") {
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  // Small: nothing is mapped on either side.
  Seen small = pool.apply<echo_and_look>(std::string(1000, 's'));
  CHECK(small.echoed == std::string(1000, 's'));
  CHECK(small.task_mappings == 0);
  CHECK(small.result_mappings == 0);
  CHECK(memfd_mappings("procpool-result") == 0);
  // Large: the worker read the task from the pool's buffer; its first large
  // result announced a buffer of its own, which the parent mapped.
  const std::string one = big(std::size_t{1} << 20, 'x');
  CHECK(pool.apply<echo_and_look>(one).echoed == one);
  Seen second = pool.apply<echo_and_look>(big(3 << 20, 'y'));
  CHECK(second.echoed == big(3 << 20, 'y'));
  CHECK(second.task_mappings >= 1);
  CHECK(second.result_mappings >= 1);
  CHECK(memfd_mappings("procpool-result") >= 1);
  // Sizes around the threshold, and many at once, arrive intact and in order.
  std::vector<std::string> mixed;
  for (std::size_t size : {std::size_t{256} << 10, (std::size_t{256} << 10) + 1, std::size_t{5} << 20, std::size_t{7},
                           std::size_t{2} << 20}) {
    mixed.push_back(big(size, static_cast<char>('0' + mixed.size())));
  }
  for (int i = 0; i < 3; ++i) mixed.insert(mixed.end(), mixed.begin(), mixed.begin() + 5);
  CHECK(pool.map<echo>(mixed, 1) == mixed);
  CHECK(pool.map<echo>(mixed, 4) == mixed);
}

POOL_TEST("a pool done with large messages lets go of its shared memory a little later", "[transport][shm]") {
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  const std::string one = big(std::size_t{2} << 20, 'q');
  CHECK(pool.apply<echo_and_look>(one).echoed == one);
  Seen seen = pool.apply<echo_and_look>(one);
  CHECK(seen.task_mappings >= 1);
  CHECK(seen.result_mappings >= 1);
  CHECK(memfd_mappings("procpool-task") >= 2);  // the probe and a buffer
  CHECK(memfd_mappings("procpool-result") >= 1);
  // Idle for ShmWriter::keep_idle_for: the pool unmaps its task buffers, the
  // worker its result buffers (telling the pool, which unmaps them too) and
  // its mappings of the pool's.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while ((memfd_mappings("procpool-task") > 1 || memfd_mappings("procpool-result") > 0) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK(memfd_mappings("procpool-task") == 1);
  CHECK(memfd_mappings("procpool-result") == 0);
  Seen after = pool.apply<echo_and_look>(std::string("small"));
  CHECK(after.task_mappings == 0);
  CHECK(after.result_mappings == 0);
  // Large messages still go through shared memory afterwards.
  Seen again = pool.apply<echo_and_look>(one);
  CHECK(again.echoed == one);
  CHECK(again.task_mappings >= 1);
}

namespace {
/// How many of process `pid`'s fds ("self": this one's) are memfds named `name`.
std::size_t memfds_named(const std::string& name, const std::string& pid = "self") {
  const auto targets = fds_beyond_stdio_of(pid);
  return static_cast<std::size_t>(std::count_if(targets.begin(), targets.end(), [&](const std::string& t) {
    return t.rfind("/memfd:" + name, 0) == 0;
  }));
}
}  // namespace

TEST_CASE("a writer holds at most ShmWriter::buffer_cap() buffers, so at most that many fds", "[transport][shm]") {
  using procpool::detail::ShmWriter;
  ShmWriter writer("procpool-fdcap");
  std::vector<procpool::detail::ShmBuffer*> busy;
  // 300 KiB messages: 1 MiB buffers, far under max_busy_bytes all together.
  for (std::size_t k = 0; k < writer.buffer_cap(); ++k) {
    busy.push_back(writer.acquire(std::size_t{300} << 10, nullptr));
    REQUIRE(busy.back() != nullptr);
  }
  CHECK(memfds_named("procpool-fdcap") == writer.buffer_cap());
  // All busy: the next message takes the pipe instead of another fd.
  CHECK(writer.acquire(std::size_t{300} << 10, nullptr) == nullptr);
  CHECK(memfds_named("procpool-fdcap") == writer.buffer_cap());
  // One idle, too small for a 2 MiB message: it is unmapped to make room.
  ShmWriter::release(*busy.front());
  CHECK(writer.acquire(std::size_t{2} << 20, nullptr) != nullptr);
  CHECK(memfds_named("procpool-fdcap") == writer.buffer_cap());
  // The idle one went (busy.front() is gone now), never a busy one.
  CHECK(std::all_of(busy.begin() + 1, busy.end(), [&](const auto* b) { return writer.find(b->mapping.data()) == b; }));
}

TEST_CASE("an announcing writer at its buffer cap drops an idle buffer, then announces the new one",
          "[transport][shm]") {
  using namespace procpool::detail;
  const std::string name = "procpool-capannounced";
  ShmWriter writer(name.c_str(), true);  // a worker's result buffers
  ShmReader reader(true);                // the parent's side of them
  // What the writer told the reader, in order, as (kind, buffer id); each
  // message is also handed to the reader, as the parent does.
  std::vector<std::pair<FrameKind, std::uint64_t>> told;
  std::vector<char> control;
  auto deliver = [&] {
    FrameView frame{};
    for (std::size_t at = 0; at < control.size(); at += frame_header_size + frame.size) {
      REQUIRE(parse_frame(control.data() + at, control.size() - at, 1 << 20, frame) == Parse::complete);
      if (frame.kind == FrameKind::shm_announce) {
        told.emplace_back(frame.kind, get<std::uint64_t>(frame.data + 8));
        CHECK(reader.adopt(frame, ::getpid()));
      } else {
        REQUIRE(frame.kind == FrameKind::shm_drop);
        told.emplace_back(frame.kind, get<std::uint64_t>(frame.data));
        reader.forget(frame);
      }
    }
    control.clear();
  };
  std::vector<ShmBuffer*> busy;
  for (std::size_t k = 0; k < writer.buffer_cap(); ++k) {
    busy.push_back(writer.acquire(std::size_t{300} << 10, &control));
    REQUIRE(busy.back() != nullptr);
    deliver();
  }
  CHECK(told.size() == writer.buffer_cap());
  CHECK(memfds_named(name) == writer.buffer_cap());
  CHECK(memfd_mappings(name) == 2 * writer.buffer_cap());  // the writer's and the reader's
  // All busy: the pipe this time, and nothing is announced.
  CHECK(writer.acquire(std::size_t{300} << 10, &control) == nullptr);
  CHECK(control.empty());
  // One idle and too small: the reader hears of its drop first, then of the new buffer.
  ShmWriter::release(*busy.front());
  const std::uint64_t dropped = busy.front()->id;
  told.clear();
  ShmBuffer* fresh = writer.acquire(std::size_t{2} << 20, &control);
  REQUIRE(fresh != nullptr);
  deliver();
  REQUIRE(told.size() == 2);
  CHECK(told[0] == std::pair{FrameKind::shm_drop, dropped});
  CHECK(told[1] == std::pair{FrameKind::shm_announce, fresh->id});
  // Both sides let go of the dropped buffer: still one fd and two mappings a buffer.
  CHECK(memfds_named(name) == writer.buffer_cap());
  CHECK(memfd_mappings(name) == 2 * writer.buffer_cap());
  // The reader can read what the new buffer carries.
  std::vector<char> message;
  const std::size_t start = begin_frame(message, FrameKind::result);
  message.insert(message.end(), 100, 'r');
  finish_frame(message, start);
  const std::vector<char> ref = ShmWriter::fill(*fresh, message.data(), message.size());
  FrameView ref_frame{};
  REQUIRE(parse_frame(ref.data(), ref.size(), 1 << 20, ref_frame) == Parse::complete);
  const auto resolved = reader.resolve(ref_frame, 1 << 20);
  CHECK(resolved.frame.kind == FrameKind::result);
  CHECK(std::string(resolved.frame.data, resolved.frame.size) == std::string(100, 'r'));
}

namespace {
/// Lowers the soft fd limit (RLIMIT_NOFILE) for its lifetime.
class SoftFdLimit {
 public:
  explicit SoftFdLimit(rlim_t soft) {
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &old_) == 0);
    rlimit lowered = old_;
    lowered.rlim_cur = std::min(soft, old_.rlim_max);
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &lowered) == 0);
    soft_ = lowered.rlim_cur;
  }
  /// The soft limit set: the one asked for, or the hard limit if that is lower.
  std::size_t soft() const { return static_cast<std::size_t>(soft_); }
  SoftFdLimit(const SoftFdLimit&) = delete;
  SoftFdLimit& operator=(const SoftFdLimit&) = delete;
  ~SoftFdLimit() { ::setrlimit(RLIMIT_NOFILE, &old_); }

 private:
  rlimit old_{};
  rlim_t soft_ = 0;
};
}  // namespace

TEST_CASE("a writer keeps fewer buffers under a low fd limit", "[transport][shm]") {
  using procpool::detail::ShmWriter;
  CHECK(ShmWriter::buffer_cap_for(1024) == ShmWriter::max_buffers);
  CHECK(ShmWriter::buffer_cap_for(SIZE_MAX) == ShmWriter::max_buffers);
  CHECK(ShmWriter::buffer_cap_for(256) == 32);
  CHECK(ShmWriter::buffer_cap_for(3) == 1);
  SoftFdLimit low(256);  // or the hard limit, if lower
  ShmWriter writer("procpool-fdlow");
  const std::size_t cap = ShmWriter::buffer_cap_for(low.soft());
  REQUIRE(cap < ShmWriter::max_buffers);
  REQUIRE(writer.buffer_cap() == cap);
  for (std::size_t k = 0; k < cap; ++k) REQUIRE(writer.acquire(std::size_t{300} << 10, nullptr) != nullptr);
  // All busy: the pipe, not one more fd.
  CHECK(writer.acquire(std::size_t{300} << 10, nullptr) == nullptr);
  CHECK(memfds_named("procpool-fdlow") == cap);
}

namespace {
/// A large task that looks how many task buffers (memfds) the pool's process holds meanwhile.
struct LargeTask {
  int pool_pid = 0;
  char fill = 0;
  std::string payload;  // big(300 KiB, fill)
  template <class A>
  void serialize(A& ar) {
    ar(pool_pid, fill, payload);
  }
};
struct LargeTaskSeen {
  std::size_t pool_buffers = 0;  // the pool's task memfds, as this task ran
  bool intact = false;           // the payload arrived whole
  template <class A>
  void serialize(A& ar) {
    ar(pool_buffers, intact);
  }
};
LargeTaskSeen pool_task_buffers(LargeTask task) {
  std::this_thread::sleep_for(std::chrono::milliseconds(10));  // while the pool encodes the rest
  LargeTaskSeen seen;
  seen.pool_buffers = memfds_named("procpool-task", std::to_string(task.pool_pid));
  seen.intact = task.payload == big(std::size_t{300} << 10, task.fill);
  return seen;
}
}  // namespace

POOL_TEST("under a low fd limit a pool holds fewer task buffers, and large messages still travel", "[transport][shm]") {
  SoftFdLimit low(256);  // or the hard limit, if lower
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  std::vector<LargeTask> tasks;
  for (int k = 0; k < 96; ++k) {
    const char fill = static_cast<char>('a' + k % 26);
    tasks.push_back({::getpid(), fill, big(std::size_t{300} << 10, fill)});
  }
  // They are encoded ahead, each into a buffer of its own while one can be
  // had (93 of them at once without the cap), the rest on the heap.
  const auto seen = pool.map<pool_task_buffers>(tasks, 1);
  REQUIRE(seen.size() == tasks.size());
  CHECK(std::all_of(seen.begin(), seen.end(), [](const LargeTaskSeen& s) { return s.intact; }));
  std::size_t most = 0;
  for (const auto& s : seen) most = std::max(most, s.pool_buffers);
  CHECK(most >= 2);  // the tasks did travel through shared memory
  CHECK(most <= procpool::detail::ShmWriter::buffer_cap_for(low.soft()) + 1);  // + the probe
}

TEST_CASE("a task buffer's idle time counts from when its task gave it back", "[transport][shm]") {
  procpool::detail::ShmWriter writer("procpool-test");
  const std::string frame(std::size_t{300} << 10, 'f');
  procpool::detail::ShmBuffer* used = nullptr;
  REQUIRE_FALSE(writer.pass(frame.data(), frame.size(), &used).empty());
  procpool::detail::ShmLease lease(used);
  const auto handed_out = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a task that ran a while
  lease.reset();
  // Idle only since the reset: a trim of buffers idle since before then keeps it.
  writer.trim(handed_out + std::chrono::milliseconds(10), nullptr);
  CHECK_FALSE(writer.empty());
  writer.trim(std::chrono::steady_clock::now() + std::chrono::milliseconds(1), nullptr);
  CHECK(writer.empty());
}

namespace {

using procpool::detail::TaskAllocator;
using procpool::detail::TaskBytes;
using procpool::detail::TaskMemory;

/// A task frame of one string item, encoded the way a pool encodes one.
TaskBytes encode_task(const std::shared_ptr<TaskMemory>& memory, const std::string& item) {
  TaskBytes frame{TaskAllocator<char>(memory)};
  std::size_t start = procpool::detail::begin_task_frame(frame, 7);
  procpool::detail::Encoder encoder(frame);
  encoder(item);
  procpool::detail::finish_task_frame(frame, start, 1);
  return frame;
}

}  // namespace

TEST_CASE("a large task frame is encoded straight into the pool's shared memory", "[transport][shm]") {
  auto memory = std::make_shared<TaskMemory>(std::size_t{256} << 10);
  REQUIRE(memory->threshold() != 0);
  // Small: on the heap; the dispatcher sends it through the pipe.
  TaskBytes small = encode_task(memory, std::string(1000, 's'));
  CHECK(memory->reference(small.data(), small.size()).empty());
  // Large: its storage is a shared buffer, which a reference frame names.
  const std::string item = big(std::size_t{1} << 20, 'x');
  TaskBytes large = encode_task(memory, item);
  std::vector<char> ref = memory->reference(large.data(), large.size());
  REQUIRE(ref.size() == procpool::detail::frame_header_size + procpool::detail::ShmLocation::encoded_size);
  CHECK(procpool::detail::get<std::uint64_t>(ref.data() + procpool::detail::frame_header_size + 16) == large.size());
  std::string decoded;
  procpool::detail::Decoder(large.data() + procpool::detail::task_prefix_size,
                            large.size() - procpool::detail::task_prefix_size)(decoded);
  CHECK(decoded == item);
  // It is busy while the frame lives, free again when it goes: the next
  // large frame reuses it rather than mapping another.
  const char* where = large.data();
  TaskBytes other = encode_task(memory, big(std::size_t{1} << 20, 'y'));
  CHECK(other.data() != where);
  large = TaskBytes{TaskAllocator<char>(memory)};
  TaskBytes again = encode_task(memory, big(std::size_t{1} << 20, 'z'));
  CHECK(again.data() == where);
  // Without shared memory every frame stays on the heap.
  auto none = std::make_shared<TaskMemory>(0);
  TaskBytes heap = encode_task(none, item);
  CHECK(none->reference(heap.data(), heap.size()).empty());
  CHECK(none->empty());
}

TEST_CASE("a task frame stays on the heap while the shared buffers are full, and is copied over later",
          "[transport][shm]") {
  auto memory = std::make_shared<TaskMemory>(std::size_t{256} << 10);
  // Busy buffers hold at most ShmWriter::max_busy_bytes; storage is only
  // reserved, not touched.
  const std::size_t each = std::size_t{60} << 20;
  std::vector<TaskBytes> held;
  for (std::size_t total = 0; total + each <= procpool::detail::ShmWriter::max_busy_bytes; total += each) {
    held.emplace_back(TaskAllocator<char>(memory));
    held.back().reserve(each);
    REQUIRE_FALSE(memory->reference(held.back().data(), 1).empty());
  }
  TaskBytes overflow = encode_task(memory, big(each, 'o'));
  CHECK(memory->reference(overflow.data(), overflow.size()).empty());
  procpool::detail::ShmLease lease;
  CHECK(memory->pass(overflow.data(), overflow.size(), lease).empty());  // still full
  held.clear();
  std::vector<char> ref = memory->pass(overflow.data(), overflow.size(), lease);
  CHECK_FALSE(ref.empty());
  // The lease keeps its buffer busy: a frame encoded now gets another one.
  TaskBytes next = encode_task(memory, big(each, 'n'));
  CHECK_FALSE(memory->reference(next.data(), next.size()).empty());
  lease.reset();
  memory->trim(std::chrono::steady_clock::now() + std::chrono::milliseconds(1));
  CHECK_FALSE(memory->empty());  // `next` still holds its buffer
  next = TaskBytes{};
  memory->trim(std::chrono::steady_clock::now() + std::chrono::milliseconds(1));
  CHECK(memory->empty());
}

TEST_CASE("threads encoding large tasks at once share the pool's buffers safely", "[transport][shm]") {
  auto memory = std::make_shared<TaskMemory>(std::size_t{256} << 10);
  std::atomic<int> placed{0}, intact{0};
  auto encode_many = [&](char fill) {
    for (int i = 0; i < 40; ++i) {
      const std::string item = big((std::size_t{300} << 10) + static_cast<std::size_t>(i) * 4096, fill);
      TaskBytes frame = encode_task(memory, item);
      if (!memory->reference(frame.data(), frame.size()).empty()) ++placed;
      std::string decoded;
      procpool::detail::Decoder(frame.data() + procpool::detail::task_prefix_size,
                                frame.size() - procpool::detail::task_prefix_size)(decoded);
      if (decoded == item) ++intact;
    }
  };
  std::thread a(encode_many, 'a'), b(encode_many, 'b');
  for (int i = 0; i < 20; ++i) {
    memory->trim(std::chrono::steady_clock::now());  // the I/O thread's trim, meanwhile
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  a.join();
  b.join();
  CHECK(intact == 80);
  CHECK(placed == 80);
}

namespace {

/// In the worker: the capacity of the argument it was given.
std::size_t capacity_given(const std::vector<char>& buffer) { return buffer.capacity(); }

/// Echoes the buffer, its first bytes replaced by the capacity it came with.
std::vector<char> echo_with_capacity(std::vector<char> buffer) {
  const std::size_t capacity = buffer.capacity();
  std::memcpy(buffer.data(), &capacity, sizeof(capacity));
  return buffer;
}

/// `count` buffers, the first of 8 MiB, each 64 KiB smaller than the one before.
std::vector<std::vector<char>> shrinking_buffers(std::size_t count, char fill) {
  std::vector<std::vector<char>> buffers;
  for (std::size_t i = 0; i < count; ++i) buffers.emplace_back((std::size_t{8} << 20) - i * (64 << 10), fill);
  return buffers;
}

}  // namespace

// A fresh argument has exactly its size as capacity; one decoded into kept
// storage has the capacity of the largest before it.
POOL_TEST("a worker decodes a large argument into the storage the previous one left", "[transport][reuse]") {
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  const std::vector<std::vector<char>> buffers = shrinking_buffers(4, 'r');
  const std::size_t largest = buffers[0].size();
  // Taken by reference: the argument itself is kept.
  std::vector<std::size_t> capacities = pool.map<capacity_given>(buffers, 1);
  for (std::size_t capacity : capacities) CHECK(capacity == largest);
  // Taken by value and returned: the result's storage is kept.
  std::vector<std::vector<char>> echoed = pool.map<echo_with_capacity>(buffers, 1);
  REQUIRE(echoed.size() == buffers.size());
  for (std::size_t i = 0; i < echoed.size(); ++i) {
    std::size_t capacity = 0;
    std::memcpy(&capacity, echoed[i].data(), sizeof(capacity));
    INFO("item " << i);
    CHECK(capacity == largest);
    CHECK(echoed[i].size() == buffers[i].size());
    CHECK(std::equal(echoed[i].begin() + sizeof(capacity), echoed[i].end(), buffers[i].begin() + sizeof(capacity)));
  }
  // A small argument gets storage of its own; the kept one stays kept for
  // the next large argument.
  const std::vector<std::vector<char>> small_between{buffers[1], std::vector<char>(1000, 'c'), buffers[2]};
  capacities = pool.map<capacity_given>(small_between, 1);
  CHECK(capacities.at(1) < 4096);
  CHECK(capacities.at(2) == largest);
  // Smaller arguments decode into the kept storage just as well, whole.
  const std::vector<std::vector<char>> mixed{std::vector<char>(1000, 's'), buffers[3], std::vector<char>(9, 't')};
  std::vector<std::vector<char>> again = pool.map<echo_with_capacity>(mixed, 1);
  REQUIRE(again.size() == mixed.size());
  for (std::size_t i = 0; i < mixed.size(); ++i) {
    CHECK(again[i].size() == mixed[i].size());
    CHECK(std::equal(again[i].begin() + sizeof(std::size_t), again[i].end(), mixed[i].begin() + sizeof(std::size_t)));
  }
}

POOL_TEST("a worker idle for a while lets go of the argument storage it kept", "[transport][reuse]") {
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  const std::vector<std::vector<char>> buffers = shrinking_buffers(3, 'i');
  CHECK(pool.map<capacity_given>(buffers, 1).at(1) == buffers[0].size());  // kept
  // Idle past ShmWriter::keep_idle_for: the next argument is fresh storage again.
  std::this_thread::sleep_for(procpool::detail::ShmWriter::keep_idle_for + std::chrono::seconds(1));
  CHECK(pool.map<capacity_given>(std::vector<std::vector<char>>{buffers[2]}).at(0) == buffers[2].size());
}

namespace {

Seen look_after(std::string s, int) { return echo_and_look(std::move(s)); }

}  // namespace

POOL_TEST("a task frame under the threshold whose storage grew into shared memory is sent from there",
          "[transport][shm]") {
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  CHECK(pool.apply<echo_and_look>(std::string("ready")).task_mappings == 0);  // the worker said it can map ours
  // The string fits the frame's storage exactly; the int after it doubles
  // the storage past the threshold, though the frame stays under it.
  const std::string item = big(std::size_t{150} << 10, 'u');
  Seen seen = pool.apply<look_after>(item, 1);
  CHECK(seen.echoed == item);
  CHECK(seen.task_mappings >= 1);
}

POOL_TEST("shared_memory_threshold 0 sends everything through the pipes", "[transport][shm]") {
  procpool::Options o = test::options<TestType>({.processes = 1});
  o.shared_memory_threshold = 0;
  procpool::Pool pool(o);
  const std::string one = big(std::size_t{2} << 20, 'z');
  CHECK(pool.apply<echo_and_look>(one).echoed == one);
  Seen second = pool.apply<echo_and_look>(one);
  CHECK(second.echoed == one);
  CHECK(second.task_mappings == 0);
  CHECK(second.result_mappings == 0);
  CHECK(memfd_mappings("procpool-result") == 0);
  CHECK(memfd_mappings("procpool-task") == 0);
}

// Run by its own ctest, transport.task_over_2gib (tests/CMakeLists.txt).
namespace {
/// The size of `v` and a sum of one byte in each 4 KiB page.
std::uint64_t size_and_pages(const std::vector<char>& v) {
  std::uint64_t sum = v.size();
  for (std::size_t i = 0; i < v.size(); i += 4096) sum += static_cast<unsigned char>(v[i]);
  return sum;
}
}  // namespace

TEST_CASE("a task over 2 GiB crosses the pipe when max_message_bytes allows it", "[.over_2gib]") {
  // The worker's loop, the same under every start method, refused any frame
  // over 2 GiB that came through its pipe (shared memory off, or workers on
  // MPI ranks), whatever max_message_bytes said.
  procpool::Options o{.processes = 1};
  o.shared_memory_threshold = 0;
  o.max_message_bytes = std::size_t{3} << 30;
  procpool::Pool pool(o);
  const std::size_t size = (std::size_t{2} << 30) + 4096;
  std::uint64_t expected = size;
  for (std::size_t i = 0; i < size; i += 4096) expected += static_cast<unsigned char>(static_cast<char>(i >> 12));
  auto result = [&] {
    std::vector<char> arg(size);
    for (std::size_t i = 0; i < size; i += 4096) arg[i] = static_cast<char>(i >> 12);
    return pool.apply_async<size_and_pages>(std::move(arg));  // encoded: the argument goes now
  }();
  CHECK(result.get() == expected);
}

POOL_TEST("shared-memory buffers are reused: their number follows the messages outstanding, not those sent",
          "[transport][shm]") {
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  // One at a time: each buffer is free again before the next task.
  for (int i = 0; i < 60; ++i) {
    std::string blob = big((std::size_t{1} << 20) + static_cast<std::size_t>(i), static_cast<char>('a' + i % 26));
    Seen seen = pool.apply<echo_and_look>(blob);
    REQUIRE(seen.echoed == blob);
    CHECK(seen.task_mappings <= 1);
    CHECK(seen.result_mappings <= 1);
  }
  CHECK(memfd_mappings("procpool-task") <= 2);  // one buffer and the probe
  CHECK(memfd_mappings("procpool-result") <= 1);
  // Streaming: what is outstanding is bounded by the in-flight window and
  // imap's read-ahead, whatever the number of items.
  procpool::Options o = test::options<TestType>({.processes = 2, .max_tasks_in_flight = 2, .imap_prefetch = 4});
  procpool::Pool streaming(o);
  std::size_t most_task = 0, most_result = 0, count = 0;
  for (const Seen& seen : streaming.imap<echo_and_look>(tv::iota(0, 150) | tv::transform([](int i) {
                                                          return big(std::size_t{1} << 20,
                                                                     static_cast<char>('a' + i % 26));
                                                        }))) {
    CHECK(seen.echoed == big(std::size_t{1} << 20, static_cast<char>('a' + count++ % 26)));
    most_task = std::max(most_task, seen.task_mappings);
    most_result = std::max(most_result, seen.result_mappings);
  }
  CHECK(count == 150);
  // Without reuse, each task would leave a buffer behind on each side: 150.
  CHECK(most_task <= 8);
  CHECK(most_result <= 8);
  CHECK(memfd_mappings("procpool-task") <= 10);
  CHECK(memfd_mappings("procpool-result") <= 16);
}

namespace {

/// Dies after reading a large task from shared memory.
std::size_t die_on_x(const std::string& s) {
  if (!s.empty() && s.back() == 'X') ::kill(::getpid(), SIGKILL);
  return s.size();
}

}  // namespace

POOL_TEST("a worker that dies holding a task in shared memory costs that task only", "[transport][shm][faults]") {
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  // A worker's first tasks may go out before it said it can reach shared memory.
  CHECK(pool.apply<die_on_x>(std::string("ready")) == 5);
  std::string doomed = big(std::size_t{2} << 20, 'd');
  doomed.back() = 'X';
  auto lost = test::thrown<procpool::WorkerLost>([&] { pool.apply<die_on_x>(doomed); });
  CHECK(lost.signal() == SIGKILL);
  // The replacement reads large tasks as before, and the dead worker's
  // buffer is free again: one at a time, one buffer serves them all.
  for (int i = 0; i < 20; ++i) CHECK(pool.apply<die_on_x>(big(std::size_t{2} << 20, 'e')) == std::size_t{2} << 20);
  CHECK(memfd_mappings("procpool-task") <= 2);  // one buffer and the probe
}

namespace {

/// Sends the parent a reference to shared memory that is not a procpool buffer.
long forge_reference(long) {
  int fake = ::memfd_create("not-procpool", MFD_CLOEXEC);
  if (fake < 0 || ::ftruncate(fake, 1 << 20) != 0) return -1;
  for (int fd = 3; fd < 256; ++fd) {
    int flags = ::fcntl(fd, F_GETFL);
    if (flags == -1 || (flags & O_ACCMODE) != O_WRONLY) continue;
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISFIFO(st.st_mode)) continue;
    char frame[32];
    const std::uint32_t length = 24, kind = 8;  // a shm_ref frame
    const std::int32_t pid = ::getpid();
    const std::uint64_t id = 1, size = 4096;
    std::memcpy(frame, &length, 4);
    std::memcpy(frame + 4, &kind, 4);
    std::memcpy(frame + 8, &pid, 4);
    std::memcpy(frame + 12, &fake, 4);
    std::memcpy(frame + 16, &id, 8);
    std::memcpy(frame + 24, &size, 8);
    [[maybe_unused]] auto n = ::write(fd, frame, sizeof(frame));
  }
  std::this_thread::sleep_for(std::chrono::seconds(60));
  return 0;
}

}  // namespace

POOL_TEST("a forged shared-memory reference is a ProtocolError, and the pool goes on", "[transport][shm][faults]") {
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  auto error = test::thrown<procpool::ProtocolError>([&] { pool.apply<forge_reference>(0L); });
  CHECK_THAT(error.what(), Catch::Contains("shared memory"));
  CHECK_THAT(error.what(), Catch::Contains("not announced"));
  const std::string one = big(std::size_t{1} << 20, 'g');
  CHECK(pool.apply<echo>(one) == one);
}

POOL_TEST("a worker that exits right after a large result loses nothing", "[transport][shm]") {
  std::vector<std::string> blobs;
  for (int i = 0; i < 24; ++i) blobs.push_back(big(std::size_t{1} << 20, static_cast<char>('a' + i)));
  // maxtasksperchild: each worker exits as soon as its last result is sent
  // (in shared memory), and its buffers go with it unless the parent holds them.
  for (std::size_t max_tasks : {std::size_t{1}, std::size_t{2}, std::size_t{3}}) {
    CAPTURE(max_tasks);
    procpool::Pool pool(test::options<TestType>({.processes = 2, .maxtasksperchild = max_tasks}));
    CHECK(pool.map<echo>(blobs, 1) == blobs);
  }
}

namespace {

std::string echo_or_die(std::string s) {
  if (s == "die") ::kill(::getpid(), SIGKILL);
  return s;
}

}  // namespace

POOL_TEST("large results sent just before their worker died arrive whole", "[transport][shm][faults]") {
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  const std::string warm = big(std::size_t{1} << 20, 'w');
  CHECK(pool.apply<echo_or_die>(warm) == warm);  // the worker can reach shared memory, and has a buffer
  // Sent together: the worker answers the three, in shared memory (the
  // second needs a new buffer while the first is still undecoded), and dies
  // at the fourth, possibly before the parent has decoded any of them.
  std::vector<std::string> blobs{big(std::size_t{1} << 20, 'x'), big(std::size_t{2} << 20, 'y'),
                                 big(std::size_t{1} << 20, 'z')};
  std::vector<procpool::AsyncResult<std::string>> results;
  for (const auto& blob : blobs) results.push_back(pool.apply_async<echo_or_die>(blob));
  auto death = pool.apply_async<echo_or_die>(std::string("die"));
  for (std::size_t i = 0; i < blobs.size(); ++i) CHECK(results[i].get() == blobs[i]);
  CHECK_THROWS_AS(death.get(), procpool::WorkerLost);
  CHECK(pool.apply<echo_or_die>(warm) == warm);
}

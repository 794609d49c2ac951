// procpool::SharedMemory: blocks the parent and its workers share, sent as
// references and never copied.
#include <sys/stat.h>

#include <cereal/archives/binary.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <ranges>
#include <set>
#include <sstream>
#include <thread>
#include <utility>

#include "common.hpp"

namespace {

using procpool::SharedMemory;

/// Writes `value + i % 7` into every byte i; returns the block it was given.
SharedMemory fill_block(SharedMemory block, int value) {
  auto bytes = block.as<unsigned char>();
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<unsigned char>(value + i % 7);
  return block;
}

bool filled_with(const SharedMemory& block, int value) {
  auto bytes = block.as<const unsigned char>();
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    if (bytes[i] != static_cast<unsigned char>(value + i % 7)) return false;
  }
  return true;
}

/// A new block of `size` bytes filled for `size` (see fill_block).
SharedMemory make_block(std::size_t size) { return fill_block(SharedMemory(size), static_cast<int>(size % 251)); }

/// The block, every byte one more.
SharedMemory add_one(SharedMemory block) {
  for (auto& b : block.as<unsigned char>()) ++b;
  return block;
}

/// The sum of a block's bytes.
std::uint64_t sum_block(const SharedMemory& block) {
  auto bytes = block.as<const unsigned char>();
  return std::accumulate(bytes.begin(), bytes.end(), std::uint64_t{0});
}

struct TwoBlocks {
  SharedMemory first, second;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(first, second);
  }
};

/// The two blocks, then the first again.
std::vector<SharedMemory> three_of_two(TwoBlocks blocks) { return {blocks.first, blocks.second, blocks.first}; }

/// A block made for `x`, unless `x % 4 == 3`: that crashes the worker
/// (SIGKILL) the first time, right after the worker's previous result.
SharedMemory block_or_crash(std::string dir, long x) {
  if (x % 4 == 3) test::crash_once(dir, x);
  return make_block(static_cast<std::size_t>(1000 + x));
}

/// Open fds of this process.
std::size_t open_fds() {
  std::size_t count = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) ++count;
  return count;
}

/// A block set in the parent before a fork pool started, as the worker sees it.
SharedMemory& global_block() {
  static SharedMemory block;
  return block;
}
SharedMemory return_global(int) { return global_block(); }
int replace_global(SharedMemory block) {
  global_block() = std::move(block);
  return static_cast<int>(global_block().size());
}

/// Where an initializer leaves the block it was given, in each worker.
SharedMemory& initial_block() {
  static SharedMemory block;
  return block;
}
void remember_block(SharedMemory block) { initial_block() = std::move(block); }
/// The byte at `at` of the block the initializer left.
int initial_byte(std::size_t at) { return static_cast<int>(initial_block().as<const unsigned char>()[at]); }

/// Writes one frame of `kind` with `payload` where the worker's results go
/// (its only write-only pipe), then waits to be killed for it.
long send_forged_frame(std::uint32_t kind, const std::vector<char>& payload) {
  for (int fd = 3; fd < 256; ++fd) {
    int flags = ::fcntl(fd, F_GETFL);
    if (flags == -1 || (flags & O_ACCMODE) != O_WRONLY) continue;
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISFIFO(st.st_mode)) continue;
    std::vector<char> frame(8);
    const auto length = static_cast<std::uint32_t>(payload.size());
    std::memcpy(frame.data(), &length, 4);
    std::memcpy(frame.data() + 4, &kind, 4);
    frame.insert(frame.end(), payload.begin(), payload.end());
    [[maybe_unused]] auto n = ::write(fd, frame.data(), frame.size());
  }
  std::this_thread::sleep_for(std::chrono::seconds(60));
  return 0;
}

constexpr std::uint32_t shm_share_kind = 12;

/// An shm_share message of the wrong size.
long share_malformed(long) { return send_forged_frame(shm_share_kind, std::vector<char>(8, 0)); }

/// An shm_share message naming a process other than the worker (its parent).
long share_foreign(long) {
  std::vector<char> payload(24, 0);
  const std::int32_t pid = ::getppid(), fd = 3;
  const std::uint64_t id = 1, size = 4096;
  std::memcpy(payload.data(), &pid, 4);
  std::memcpy(payload.data() + 4, &fd, 4);
  std::memcpy(payload.data() + 8, &id, 8);
  std::memcpy(payload.data() + 16, &size, 8);
  return send_forged_frame(shm_share_kind, payload);
}

long plus_one(long x) { return x + 1; }

/// The worker's pid and a block made for `size` (as make_block), after
/// leaking 40 MiB of touched memory.
std::pair<long, SharedMemory> leak_then_block(std::size_t size) {
  static std::vector<std::vector<char>> kept;
  kept.emplace_back(40u << 20, 'x');
  return {static_cast<long>(::getpid()), make_block(size)};
}

}  // namespace

POOL_TEST("a SharedMemory argument is the parent's memory: what the worker writes, the parent sees",
          "[shared_memory]") {
  // Made before the pool: a forked worker must not take the parent's
  // mapping for its own (it is not mapped in a fork).
  SharedMemory block(3 << 20);
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  SharedMemory returned = pool.apply<fill_block>(block, 40);
  CHECK(filled_with(block, 40));
  // The same block came back: the parent's own mapping, nothing copied.
  CHECK(returned.shares_with(block));
  CHECK(returned.data() == block.data());
  // Blocks in a map: each worker writes its own, in place.
  std::vector<SharedMemory> blocks;
  for (int i = 0; i < 6; ++i) blocks.emplace_back(std::size_t{1} << 20);
  std::vector<SharedMemory> results =
      pool.starmap<fill_block>(tv::iota(0, 6) | tv::transform([&](int i) { return std::tuple(blocks[i], 100 + i); }),
                               1);
  REQUIRE(results.size() == blocks.size());
  for (int i = 0; i < 6; ++i) {
    INFO("block " << i);
    CHECK(filled_with(blocks[i], 100 + i));
    CHECK(results[i].shares_with(blocks[i]));
  }
}

POOL_TEST("a SharedMemory a worker makes reaches the parent, even from a worker that exits right after",
          "[shared_memory]") {
  // maxtasksperchild = 1: each worker exits as soon as it has sent its
  // result, which refers to a block only it held.
  procpool::Pool pool(test::options<TestType>({.processes = 2, .maxtasksperchild = 1}));
  std::vector<std::size_t> sizes{1, 4096, 100'000, std::size_t{2} << 20, 0, 77, 5000, 1 << 16, 3, 12345};
  std::vector<SharedMemory> blocks = pool.map<make_block>(sizes, 1);
  REQUIRE(blocks.size() == sizes.size());
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    INFO("size " << sizes[i]);
    CHECK(blocks[i].size() == sizes[i]);
    CHECK(blocks[i].empty() == (sizes[i] == 0));
    CHECK(filled_with(blocks[i], static_cast<int>(sizes[i] % 251)));
  }
}

POOL_TEST("a SharedMemory the caller lets go of after imap encoded it lives until the worker has it",
          "[shared_memory]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  // Each block is made by the view, encoded, and destroyed in the parent
  // before (or while) a worker maps it.
  auto made = tv::iota(std::size_t{1}, std::size_t{41}) |
              tv::transform([](std::size_t i) { return fill_block(SharedMemory(i * 1000), 3); });
  std::vector<std::uint64_t> sums;
  for (std::uint64_t sum : pool.imap<sum_block>(made, 1)) sums.push_back(sum);
  REQUIRE(sums.size() == 40);
  for (std::size_t i = 1; i <= 40; ++i) {
    SharedMemory expected(i * 1000);
    fill_block(expected, 3);
    CHECK(sums[i - 1] == sum_block(expected));
  }
  // Returned, such a block is the caller's only copy of it.
  std::size_t seen = 0;
  for (SharedMemory block : pool.imap_unordered<add_one>(made, 1)) {
    ++seen;
    INFO("a block of " << block.size() << " bytes");
    CHECK(block.size() % 1000 == 0);
    CHECK(filled_with(block, 4));
  }
  CHECK(seen == 40);
}

POOL_TEST("a worker that crashes right after a result loses none of the blocks it returned", "[shared_memory]") {
  // Tasks are short, so each worker holds several at once and goes straight
  // from a result to the task that kills it.
  test::TempDir dir;
  procpool::Pool pool(test::options<TestType>({.processes = 2, .retries = 1}));
  std::vector<std::tuple<std::string, long>> in;
  for (long x = 0; x < 24; ++x) in.emplace_back(dir.path(), x);
  std::vector<SharedMemory> blocks = pool.starmap<block_or_crash>(in, 1);
  REQUIRE(blocks.size() == in.size());
  for (long x = 0; x < 24; ++x) {
    INFO("item " << x);
    CHECK(blocks[static_cast<std::size_t>(x)].size() == static_cast<std::size_t>(1000 + x));
    CHECK(filled_with(blocks[static_cast<std::size_t>(x)], static_cast<int>((1000 + x) % 251)));
  }
  CHECK(dir.files().size() == 6);
}

POOL_TEST("blocks and their fds are let go of once the results are", "[shared_memory]") {
  procpool::Pool pool(test::options<TestType>({.processes = 2}));
  pool.apply<make_block>(std::size_t{10});
  const std::size_t before = open_fds();
  for (int round = 0; round < 3; ++round) {
    std::vector<SharedMemory> blocks = pool.map<make_block>(std::vector<std::size_t>(20, 100'000), 1);
    CHECK(blocks.size() == 20);
    CHECK(open_fds() >= before + 20);  // each block held here is an open memfd
  }
  CHECK(open_fds() == before);
}

TEST_CASE("a block a forked worker inherited is not used there, and is refused if sent", "[shared_memory]") {
  global_block() = make_block(4096);
  {
    procpool::Pool pool(test::options<test::Fork>({.processes = 1}));
    auto e = test::thrown<procpool::RemoteError>([&] { pool.apply<return_global>(0); });
    CHECK_THAT(e.what(), Catch::Contains("copied into this one by fork()"));
    // Replacing it in the worker neither unmaps nor closes what is not the worker's.
    CHECK(pool.apply<replace_global>(make_block(100)) == 100);
    CHECK(pool.apply<replace_global>(make_block(200)) == 200);
    CHECK(filled_with(pool.apply<return_global>(0), 200 % 251));
  }
  CHECK(filled_with(global_block(), 4096 % 251));
  global_block() = SharedMemory();
}

POOL_TEST("SharedMemory travels inside structs and vectors, and one block twice stays one block", "[shared_memory]") {
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  TwoBlocks blocks{make_block(1000), make_block(2000)};
  std::vector<SharedMemory> three = pool.apply<three_of_two>(blocks);
  REQUIRE(three.size() == 3);
  CHECK(three[0].shares_with(blocks.first));
  CHECK(three[1].shares_with(blocks.second));
  CHECK(three[2].shares_with(blocks.first));
  // A block a worker made, sent back to a worker and returned: still the one block.
  SharedMemory made = pool.apply<make_block>(std::size_t{5000});
  SharedMemory again = pool.apply<fill_block>(made, 9);
  CHECK(again.shares_with(made));
  CHECK(filled_with(made, 9));
}

POOL_TEST("an initializer's SharedMemory argument is the parent's memory in every worker", "[shared_memory]") {
  SharedMemory block(4096);
  procpool::Pool pool(
      test::options<TestType>({.processes = 2, .initializer = procpool::initializer<remember_block>(block)}));
  // Written after the workers started: they see it, as they share the pages.
  block.as<unsigned char>()[10] = 201;
  block.as<unsigned char>()[4095] = 202;
  std::vector<std::size_t> at{10, 4095, 0, 10, 4095, 10};
  CHECK(pool.map<initial_byte>(at, 1) == std::vector<int>{201, 202, 0, 201, 202, 201});
}

TEST_CASE("a SharedMemory in another cereal archive is saved and loaded by value", "[shared_memory]") {
  SharedMemory block = make_block(10'000);
  std::stringstream stream;
  {
    cereal::BinaryOutputArchive out(stream);
    out(block, SharedMemory());
  }
  SharedMemory loaded, empty(1);
  {
    cereal::BinaryInputArchive in(stream);
    in(loaded, empty);
  }
  CHECK(loaded.size() == block.size());
  CHECK(filled_with(loaded, static_cast<int>(10'000 % 251)));
  CHECK_FALSE(loaded.shares_with(block));
  CHECK(empty.empty());
}

TEST_CASE("a SharedMemory reference that cannot be opened fails naming the process and the reason", "[shared_memory]") {
  std::vector<char> bytes;
  {
    procpool::detail::Encoder encoder(bytes);
    // A block "held" by this process as fd 0, which is no procpool memory.
    encoder(std::uint8_t{1}, static_cast<std::int32_t>(::getpid()), std::int32_t{0}, std::uint64_t{12345},
            std::uint64_t{4096});
  }
  SharedMemory block;
  procpool::detail::Decoder decoder(bytes.data(), bytes.size());
  auto e = test::thrown<std::runtime_error>([&] { decoder(block); });
  CHECK_THAT(e.what(),
             Catch::Contains("cannot map the block of 4096 bytes that process " + std::to_string(::getpid())));
  CHECK_THAT(e.what(), Catch::Contains("/proc/"));
}

TEST_CASE("a SharedMemory in a message that cannot keep it alive is refused", "[shared_memory]") {
  std::vector<char> bytes;
  procpool::detail::Encoder encoder(bytes);
  auto e = test::thrown<std::logic_error>([&] { encoder(SharedMemory(10)); });
  CHECK_THAT(e.what(), Catch::Contains("procpool::SharedMemory can travel only"));
}

POOL_TEST("a malformed or foreign SharedMemory announcement is a ProtocolError, and the pool goes on",
          "[shared_memory][faults]") {
  procpool::Pool pool(test::options<TestType>({.processes = 1}));
  auto malformed = test::thrown<procpool::ProtocolError>([&] { pool.apply<share_malformed>(0L); });
  CHECK_THAT(malformed.what(), Catch::Contains("malformed shm_share"));
  CHECK_THAT(malformed.what(), Catch::Contains("worker 0"));
  auto foreign = test::thrown<procpool::ProtocolError>([&] { pool.apply<share_foreign>(0L); });
  CHECK_THAT(foreign.what(), Catch::Contains("another process's memory"));
  CHECK(pool.map<plus_one>(std::vector<long>{1, 2, 3}) == std::vector<long>{2, 3, 4});
}

POOL_TEST("a SharedMemory from a worker that leaves over its memory cap reaches the parent", "[shared_memory]") {
  // Each worker can hold one 40 MiB leak, not two: it leaves after its
  // second task, whose result refers to a block only it held.
  procpool::Pool pool(test::options<TestType>({.processes = 2, .max_memory_per_child = 60u << 20}));
  std::vector<std::size_t> sizes{10, 4096, 100'000, 77, 5000, 1 << 16, 3, 12345};
  auto results = pool.map<leak_then_block>(sizes, 1);
  REQUIRE(results.size() == sizes.size());
  std::set<long> pids;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    INFO("size " << sizes[i]);
    pids.insert(results[i].first);
    CHECK(results[i].second.size() == sizes[i]);
    CHECK(filled_with(results[i].second, static_cast<int>(sizes[i] % 251)));
  }
  CHECK(pids.size() >= 4);  // the workers did leave
}

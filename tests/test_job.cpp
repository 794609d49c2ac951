// A call's mailbox (JobState) on its own: which deliveries wake the caller,
// and how imap takes what is ready; then imap's refills through a real pool.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <thread>
#include <vector>

#include "common.hpp"

namespace {

using procpool::detail::ChunkOutcome;
using procpool::detail::JobState;

struct Arrival {
  std::uint64_t chunk;
  ChunkOutcome outcome;
  std::size_t items;
};

ChunkOutcome outcome_of(std::size_t bytes) {
  ChunkOutcome outcome;
  outcome.payload.assign(bytes, 'x');
  return outcome;
}

long job_square(long x) { return x * x; }

/// Whether this task came flagged for the worker to look for the next before sleeping.
bool flagged_more_queued(long) { return procpool::detail::running_task_more_queued(); }

std::size_t count_flagged(const std::vector<bool>& flags) {
  return static_cast<std::size_t>(std::count(flags.begin(), flags.end(), true));
}

}  // namespace

TEST_CASE("the callback runner refuses work once stopped, so that its caller runs it", "[job][callbacks]") {
  procpool::detail::CallbackRunner never_started;
  never_started.stop();
  CHECK_THROWS_AS(never_started.post([] {}), std::runtime_error);
  procpool::detail::CallbackRunner runner;
  std::atomic<int> ran{0};
  runner.post([&ran] { ++ran; });
  runner.stop();
  CHECK(ran == 1);
  CHECK_THROWS_AS(runner.post([&ran] { ++ran; }), std::runtime_error);
  CHECK(ran == 1);
}

TEST_CASE("a caller waiting for a batch of chunks is woken once, not for each chunk", "[job]") {
  JobState job("map");
  std::size_t taken = 0;
  std::thread caller([&] {
    std::vector<ChunkOutcome> run;
    job.take_run(0, 40, run);
    taken = run.size();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let it wait
  for (std::uint64_t chunk = 0; chunk < 40; ++chunk) {
    job.deliver(chunk, outcome_of(8), 1);
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  caller.join();
  CHECK(taken == 40);
  CHECK(job.wakeups() <= 1);
}

TEST_CASE("outcomes delivered together reach a waiting imap caller together", "[job]") {
  JobState job("imap_unordered");
  std::vector<std::pair<std::uint64_t, ChunkOutcome>> got;
  std::thread caller([&] { got = job.take_some(std::nullopt, std::nullopt, 100, SIZE_MAX); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::vector<Arrival> batch;
  for (std::uint64_t chunk = 0; chunk < 10; ++chunk) batch.push_back({chunk, outcome_of(8), 1});
  job.deliver(batch.begin(), batch.end());
  caller.join();
  REQUIRE(got.size() == 10);
  for (std::uint64_t chunk = 0; chunk < 10; ++chunk) CHECK(got[chunk].first == chunk);
  CHECK(job.wakeups() <= 1);
  CHECK(job.delivered() == 10);
  CHECK(job.ready_bytes() == 0);
}

TEST_CASE("imap takes ready outcomes in order up to a gap, a count and a byte bound", "[job]") {
  JobState job("imap");
  for (std::uint64_t chunk : {0, 1, 2, 4, 5}) job.deliver(chunk, outcome_of(100), 1);
  const auto now = procpool::detail::Clock::now();

  SECTION("ordered: from the first asked for up to the first missing") {
    auto got = job.take_some(0, now, 100, SIZE_MAX);
    REQUIRE(got.size() == 3);
    CHECK(got[2].first == 2);
    CHECK(job.take_some(3, now, 100, SIZE_MAX).empty());  // chunk 3 never came: the deadline passed
    got = job.take_some(4, now, 100, SIZE_MAX);
    REQUIRE(got.size() == 2);
    CHECK(got[1].first == 5);
  }
  SECTION("at most `most`, and past the first only while under the byte bound") {
    CHECK(job.take_some(std::nullopt, now, 2, SIZE_MAX).size() == 2);
    CHECK(job.take_some(std::nullopt, now, 100, 250).size() == 2);  // 200 bytes, not 300
    CHECK(job.take_some(std::nullopt, now, 100, 10).size() == 1);   // the first, however large
    CHECK(job.ready_bytes() == 0);
    CHECK(job.take_some(std::nullopt, now, 100, SIZE_MAX).empty());
  }
}

POOL_TEST("imap refills its prefetch in batches, not one chunk per result", "[imap]") {
  procpool::Pool pool(test::options<TestType>({.imap_prefetch = 8}));
  long pulled = 0;
  auto counting = test::counted_iota(pulled, 400);
  std::vector<long> steps;  // how many inputs each refill read
  long before = 0;
  long seen = 0;
  for (long v : pool.imap<job_square>(counting, 1)) {
    CHECK(v == seen * seen);
    ++seen;
    if (pulled != before) steps.push_back(pulled - before);
    before = pulled;
  }
  CHECK(seen == 400);
  REQUIRE(steps.size() > 1);
  // Before the first result is yielded: two chunks per worker, then, once
  // a result is in, the rest of the prefetch.
  CHECK(steps.front() == 8);
  // Every later refill reads at least a quarter of the prefetch, except the
  // last, which can stop at the input's end.
  for (std::size_t k = 1; k + 1 < steps.size(); ++k) {
    CAPTURE(k, steps[k]);
    CHECK(steps[k] >= 2);
  }
}

TEST_CASE("one flow control: a map counts its unanswered tasks, an imap what it has not taken", "[job][flow]") {
  using procpool::detail::Flow;
  using procpool::detail::FlowLimits;
  const FlowLimits map{.bytes = 250, .floor = 3};
  const FlowLimits imap{.bytes = 250, .floor = 1, .most = 8, .blind = 4, .results = true};
  Flow flow;
  // Before any answer: the imap sends at most `blind` chunks, the map as
  // many as its bytes allow.
  CHECK(flow.room(imap, 3, 30));
  CHECK_FALSE(flow.room(imap, 4, 40));
  flow.sending(0, {100, 100, 100, 100});
  CHECK_FALSE(flow.room(map, 0, 10));  // 400 task bytes unanswered, 4 chunks: over both
  // Two answers with large results: the map's unanswered tasks fall to 2,
  // under its floor. The imap counts the tasks it has not taken, their
  // results, and the 2 results to come as large as the largest.
  flow.answered(0, 60);
  flow.answered(1, 60);
  CHECK(flow.room(map, 0, 10));
  CHECK(flow.ready_bytes() == 120);
  CHECK_FALSE(flow.room(imap, 0, 0));  // 400 + 120 + 2 * 60
  flow.taken(0, 60);
  flow.taken(1, 60);
  CHECK(flow.ready_bytes() == 0);
  CHECK_FALSE(flow.room(imap, 0, 0));  // 200 + 2 * 60
  // Answered, not taken: their tasks still count for the imap.
  flow.answered(2, 10);
  flow.answered(3, 10);
  CHECK_FALSE(flow.room(imap, 1, 10));  // 200 + 10 + 20 + 1 * 60
  flow.taken(2, 10);
  flow.taken(3, 10);
  CHECK(flow.room(imap, 1, 10));         // 10 + 1 * 60
  CHECK_FALSE(flow.room(imap, 1, 200));  // 200 + 1 * 60
  // Nothing out: one chunk may always go, however large.
  CHECK(flow.room(imap, 0, 1000));
  CHECK(flow.room(map, 0, 1000));
  // At most `most` chunks not taken, whatever their bytes.
  flow.sending(4, std::vector<std::size_t>(7, 1));
  const FlowLimits count_only{.floor = 1, .most = 8, .results = true};
  CHECK(flow.room(count_only, 0, 0));
  CHECK_FALSE(flow.room(count_only, 1, 1));
}

TEST_CASE("a ring queue keeps its order across wrap-around and growth, and lets go of what it removes", "[job]") {
  using procpool::detail::Ring;
  Ring<std::shared_ptr<int>> ring;
  auto owned = std::make_shared<int>(0);
  std::vector<int> model;  // what the ring should hold, front first
  int next = 0;
  // Wrap around the first 8 slots many times, then grow past them while wrapped.
  for (int round = 0; round < 20; ++round) {
    for (int k = 0; k < 5; ++k) {
      ring.push_back(std::make_shared<int>(next));
      model.push_back(next++);
    }
    for (int k = 0; k < 4; ++k) {
      REQUIRE(*ring.front() == model.front());
      ring.pop_front();
      model.erase(model.begin());
    }
  }
  ring.push_front(owned);
  model.insert(model.begin(), 0);
  ring.erase(3);  // from the middle
  model.erase(model.begin() + 3);
  REQUIRE(ring.size() == model.size());
  for (std::size_t k = 0; k < model.size(); ++k) CHECK(*ring[k] == model[k]);
  CHECK(owned.use_count() == 2);
  ring.pop_front();
  CHECK(owned.use_count() == 1);  // the slot it was in no longer holds it
  std::size_t seen = 0;
  for (const auto& p : ring) CHECK(*p == model[++seen]);
  CHECK(seen == ring.size());
  ring.clear();
  CHECK(ring.empty());
}

TEST_CASE("outcomes arriving out of order are taken in chunk order", "[job]") {
  JobState job("imap");
  for (std::uint64_t chunk : {3, 0, 5, 1, 4, 2, 7}) job.deliver(chunk, outcome_of(1), 1);
  const auto now = procpool::detail::Clock::now();
  auto got = job.take_some(0, now, 100, SIZE_MAX);
  REQUIRE(got.size() == 6);
  for (std::uint64_t chunk = 0; chunk < 6; ++chunk) CHECK(got[chunk].first == chunk);
  CHECK(job.take_some(6, now, 100, SIZE_MAX).empty());
  job.deliver(6, outcome_of(1), 1);
  std::vector<ChunkOutcome> run;
  job.take_run(6, 8, run);
  CHECK(run.size() == 2);
  CHECK(job.ready_bytes() == 0);
}

TEST_CASE("a chunk outcome keeps small and large encoded results alike", "[job]") {
  for (std::size_t size :
       {std::size_t{1}, ChunkOutcome::small_capacity, ChunkOutcome::small_capacity + 1, std::size_t{100000}}) {
    std::vector<char> bytes(size);
    for (std::size_t k = 0; k < size; ++k) bytes[k] = static_cast<char>(k * 7);
    ChunkOutcome outcome;
    outcome.copy_bytes(bytes.data(), bytes.size());
    ChunkOutcome moved = std::move(outcome);
    auto kept = moved.bytes();
    CHECK(std::vector<char>(kept.begin(), kept.end()) == bytes);
    CHECK(moved.held_bytes() == size);
  }
}

TEST_CASE("a ring emptied after a burst lets its array go, and works on", "[job]") {
  using procpool::detail::Ring;
  Ring<int> ring;
  const std::size_t burst = 4 * Ring<int>::keep_capacity;
  for (std::size_t k = 0; k < burst; ++k) ring.push_back(static_cast<int>(k));
  CHECK(ring.capacity() >= burst);
  for (std::size_t k = 0; k < burst; ++k) {
    REQUIRE(ring.front() == static_cast<int>(k));
    ring.pop_front();
  }
  CHECK(ring.capacity() == 0);
  ring.push_back(7);
  ring.push_front(6);
  CHECK(ring.front() == 6);
  CHECK(ring.back() == 7);
  // A small ring keeps its slots when emptied: a steady stream allocates nothing.
  ring.pop_front();
  ring.pop_front();
  CHECK(ring.capacity() == 8);
}

POOL_TEST("map's tasks ask their worker to look for the next before sleeping; imap's and apply's do not", "[job]") {
  const auto in = tv::iota(0L, 300L);
  {
    procpool::Pool pool(test::options<TestType>({.processes = 2}));
    // One batch of 300 queued at once: every task but the last sent has more behind it.
    CHECK(count_flagged(pool.map<flagged_more_queued>(in, 1)) > 0);
    // imap's caller needs the CPU its workers would look with.
    std::vector<bool> streamed;
    for (bool flag : pool.imap_unordered<flagged_more_queued>(in)) streamed.push_back(flag);
    CHECK(streamed.size() == 300);
    CHECK(count_flagged(streamed) == 0);
    // Nothing queued behind a lone task.
    CHECK_FALSE(pool.apply<flagged_more_queued>(1L));
  }
  procpool::Pool quiet(test::options<TestType>({.processes = 2, .worker_spin = false}));
  const auto flags = quiet.map<flagged_more_queued>(in, 1);
  CHECK(flags.size() == 300);
  CHECK(count_flagged(flags) == 0);
}

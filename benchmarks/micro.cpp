// Micro benchmarks of procpool's hot paths (Google Benchmark):
//
//   Encoder/DecoderOneLong  the archives alone: construct one, put one long through
//   EncodeTask    the parent builds a task frame: header, callable, items (cereal)
//   WorkerRun     the worker parses the frame, decodes the items, calls the
//                 function and encodes the results into its reused output buffer
//   DecodeResult  the parent decodes a result payload into values
//   SerialPath    the three above in a row: all serialization work of one task,
//                 without any I/O
//   Pool*         whole round trips through a real pool (StartMethod::fork,
//                 2 workers): apply latency, map of 1000 ints with chunksize 1,
//                 and one chunk of 100 ints
//
// each for a task of one long, a chunk of 100 longs, and one 1 MiB std::vector<char>.
//
// usage: procpool_bench_micro [--benchmark_filter=...] [other Google Benchmark flags]
#include <procpool/procpool.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace {

using namespace procpool::detail;

long identity(long x) { return x; }
std::vector<char> echo(std::vector<char> buffer) { return buffer; }

/// One task's items: a single long.
struct OneLong {
  using Arg = long;
  using F = FnConst<identity>;
  static std::vector<Arg> items() { return {42}; }
};

/// One chunk of 100 longs.
struct Chunk100 {
  using Arg = long;
  using F = FnConst<identity>;
  static std::vector<Arg> items() {
    std::vector<long> v(100);
    std::iota(v.begin(), v.end(), 0L);
    return v;
  }
};

/// One 1 MiB byte buffer.
struct Bytes1MiB {
  using Arg = std::vector<char>;
  using F = FnConst<echo>;
  static std::vector<Arg> items() { return {std::vector<char>(std::size_t{1} << 20, 'x')}; }
};

template <class Kind>
std::size_t payload_bytes(const std::vector<typename Kind::Arg>& items) {
  if constexpr (std::is_same_v<typename Kind::Arg, long>) {
    return items.size() * sizeof(long);
  } else {
    std::size_t n = 0;
    for (auto& item : items) n += item.size();
    return n;
  }
}

/// What the parent does per chunk in Pool::map: a fresh frame, header, callable, items.
template <class Kind>
TaskBytes encode_task(const std::vector<typename Kind::Arg>& items) {
  using Arg = typename Kind::Arg;
  using F = typename Kind::F;
  TaskBytes frame;  // as a pool's, on the heap: no shared memory here
  std::size_t start = begin_task_frame(frame, 1234);
  {
    Encoder encoder(frame);
    save_callable(encoder, F{});
    for (const Arg& item : items) encoder(item);
  }
  finish_task_frame(frame, start, static_cast<std::uint32_t>(items.size()));
  return frame;
}

/// What the worker does per task (worker_main): parse, decode, call, encode
/// into its reused output buffer.
template <class Kind>
void run_task(const TaskBytes& task, std::vector<char>& out) {
  FrameView frame{};
  if (parse_frame(task.data(), task.size(), std::size_t{1} << 31, frame) != Parse::complete) std::abort();
  const auto count = get<std::uint32_t>(frame.data + 8);
  out.clear();
  std::size_t start = begin_frame(out, FrameKind::result);
  put<std::uint64_t>(out, 1);  // the task id, from its header
  put<std::uint64_t>(out, 0);
  {
    Decoder decoder(frame.data + task_body_offset, frame.size - task_body_offset);
    Encoder encoder(out);
    CallHandler<typename Kind::F, typename Kind::Arg, false>::run(decoder, count, encoder);
  }
  finish_frame(out, start);
}

/// What the parent does per result: the dispatcher copies the payload out of
/// its inbox, the caller decodes it.
template <class Kind>
std::size_t decode_result(const std::vector<char>& result, std::size_t count) {
  ChunkOutcome outcome;
  outcome.payload.assign(result.begin() + static_cast<std::ptrdiff_t>(frame_header_size + ResultHead::encoded_size),
                         result.end());
  std::size_t total = 0;
  decode_chunk<typename Kind::Arg>(
      outcome, "map", false, 0, count,
      [&](std::size_t, typename Kind::Arg&& value) {
        if constexpr (std::is_same_v<typename Kind::Arg, long>) {
          total += static_cast<std::size_t>(value);
        } else {
          total += value.size();
        }
      },
      [](std::size_t, std::exception_ptr e) { std::rethrow_exception(e); });
  return total;
}

template <class Kind>
void set_counters(benchmark::State& state, const std::vector<typename Kind::Arg>& items) {
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * items.size()));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * payload_bytes<Kind>(items)));
}

template <class Kind>
void EncodeTask(benchmark::State& state) {
  auto items = Kind::items();
  for (auto _ : state) {
    auto frame = encode_task<Kind>(items);
    benchmark::DoNotOptimize(frame.data());
  }
  set_counters<Kind>(state, items);
}

template <class Kind>
void WorkerRun(benchmark::State& state) {
  auto items = Kind::items();
  auto task = encode_task<Kind>(items);
  std::vector<char> out;
  for (auto _ : state) {
    run_task<Kind>(task, out);
    benchmark::DoNotOptimize(out.data());
  }
  set_counters<Kind>(state, items);
}

template <class Kind>
void DecodeResult(benchmark::State& state) {
  auto items = Kind::items();
  std::vector<char> result;
  run_task<Kind>(encode_task<Kind>(items), result);
  for (auto _ : state) benchmark::DoNotOptimize(decode_result<Kind>(result, items.size()));
  set_counters<Kind>(state, items);
}

template <class Kind>
void SerialPath(benchmark::State& state) {
  auto items = Kind::items();
  std::vector<char> out;
  for (auto _ : state) {
    auto frame = encode_task<Kind>(items);
    run_task<Kind>(frame, out);
    benchmark::DoNotOptimize(decode_result<Kind>(out, items.size()));
  }
  set_counters<Kind>(state, items);
}

// What a one-long task pays for the archives alone: an Encoder (std::ostream +
// cereal archive) or Decoder constructed around a buffer, one long through it.
void EncoderOneLong(benchmark::State& state) {
  std::vector<char> buffer;
  buffer.reserve(64);
  for (auto _ : state) {
    buffer.clear();
    Encoder encoder(buffer);
    encoder(42L);
    benchmark::DoNotOptimize(buffer.data());
  }
  state.SetItemsProcessed(state.iterations());
}

void DecoderOneLong(benchmark::State& state) {
  std::vector<char> buffer;
  {
    Encoder encoder(buffer);
    encoder(42L);
  }
  for (auto _ : state) {
    Decoder decoder(buffer.data(), buffer.size());
    long value = 0;
    decoder(value);
    benchmark::DoNotOptimize(value);
  }
  state.SetItemsProcessed(state.iterations());
}

BENCHMARK(EncoderOneLong);
BENCHMARK(DecoderOneLong);
BENCHMARK(EncodeTask<OneLong>);
BENCHMARK(EncodeTask<Chunk100>);
BENCHMARK(EncodeTask<Bytes1MiB>);
BENCHMARK(WorkerRun<OneLong>);
BENCHMARK(WorkerRun<Chunk100>);
BENCHMARK(WorkerRun<Bytes1MiB>);
BENCHMARK(DecodeResult<OneLong>);
BENCHMARK(DecodeResult<Chunk100>);
BENCHMARK(DecodeResult<Bytes1MiB>);
BENCHMARK(SerialPath<OneLong>);
BENCHMARK(SerialPath<Chunk100>);
BENCHMARK(SerialPath<Bytes1MiB>);

// ---- whole round trips through a pool ----------------------------------------

procpool::Pool make_pool() {
  procpool::Pool pool({.processes = 2, .start_method = procpool::StartMethod::fork});
  pool.map<identity>(std::vector<long>(100, 1L), 1);  // workers up, task timing known
  return pool;
}

void PoolApply(benchmark::State& state) {
  auto pool = make_pool();
  long sum = 0;
  for (auto _ : state) sum += pool.apply<identity>(1L);
  benchmark::DoNotOptimize(sum);
  state.SetItemsProcessed(state.iterations());
}

void PoolMap1000Chunksize1(benchmark::State& state) {
  auto pool = make_pool();
  std::vector<long> items(1000);
  std::iota(items.begin(), items.end(), 0L);
  for (auto _ : state) benchmark::DoNotOptimize(pool.map<identity>(items, 1).data());
  state.SetItemsProcessed(state.iterations() * 1000);
}

void PoolMapOneChunk100(benchmark::State& state) {
  auto pool = make_pool();
  auto items = Chunk100::items();
  for (auto _ : state) benchmark::DoNotOptimize(pool.map<identity>(items, 100).data());
  state.SetItemsProcessed(state.iterations() * 100);
}

// The work happens in other processes: wall-clock time is the measure.
BENCHMARK(PoolApply)->UseRealTime();
BENCHMARK(PoolMap1000Chunksize1)->UseRealTime();
BENCHMARK(PoolMapOneChunk100)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);  // before anything else, as in every procpool program
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

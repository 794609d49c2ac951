// procpool on MPI ranks: the same Pool API, its workers on serving ranks.
// Run by ctest under `mpirun -np 3` (world) and as a plain program (spawn),
// chosen by PROCPOOL_TEST_BACKEND; see tests/mpi/CMakeLists.txt.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <procpool/mpi.hpp>

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;
using procpool::StartMethod;

const StartMethod methods[] = {StartMethod::fork, StartMethod::posix_spawn, StartMethod::forkserver};

std::string mode() {
  const char* m = std::getenv("PROCPOOL_TEST_BACKEND");
  return m != nullptr ? m : "world";
}

procpool::Backend backend(procpool::mpi::Settings settings = {}) {
  return mode() == "spawn" ? procpool::mpi::spawn(2, std::move(settings)) : procpool::mpi::world(std::move(settings));
}

procpool::Options options(StartMethod method, std::size_t processes = 2) {
  procpool::Options o;
  o.processes = processes;
  o.start_method = method;
  o.backend = backend();
  return o;
}

long square(long x) { return x * x; }
long add(long a, long b) { return a + b; }
long fails_on_7(long x) {
  if (x == 7) throw std::invalid_argument("seven");
  return x;
}
long crashes_on_3(long x) {
  if (x == 3) ::raise(SIGSEGV);
  return x;
}
long sleeps(long ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return ms;
}
long my_pid(long) { return ::getpid(); }
long sleeps_then_pid(long ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return ::getpid();
}
std::vector<char> echo(std::vector<char> v) { return v; }

pid_t parent_of(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  std::istringstream rest(text.substr(text.rfind(')') + 2));
  char state;
  pid_t ppid = 0;
  rest >> state >> ppid;
  return ppid;
}

std::string comm(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/comm");
  std::string s;
  std::getline(f, s);
  return s;
}

/// The serving rank this worker runs for: its ancestor that MPI's launcher
/// (mpirun, or the orted it starts) started.
long rank_pid(long) {
  pid_t pid = ::getppid();
  for (int k = 0; k < 8 && pid > 1; ++k) {
    const std::string up = comm(parent_of(pid));
    if (up == "mpirun" || up == "orted" || up == "orterun" || up == "mpiexec" || up == "prterun") return pid;
    pid = parent_of(pid);
  }
  throw std::runtime_error("no MPI launcher among the worker's ancestors");
}

/// Kills the serving rank this worker runs for (and so, this worker).
long kill_my_rank(long) {
  ::kill(static_cast<pid_t>(rank_pid(0)), SIGKILL);
  std::this_thread::sleep_for(10s);
  return 0;
}

double cpu_seconds(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  std::istringstream rest(text.substr(text.rfind(')') + 2));
  std::string field;
  for (int k = 3; k < 14; ++k) rest >> field;  // fields 3..13
  unsigned long utime = 0, stime = 0;
  rest >> utime >> stime;
  return static_cast<double>(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

/// A small item: dies 300 ms later, with the large ones queued behind it.
std::size_t dies_on_small(std::vector<char> v) {
  if (v.size() == 1) {
    std::this_thread::sleep_for(300ms);
    ::raise(SIGKILL);
  }
  return v.size();
}

/// Dies while a child it forked (without exec) holds its pipes for 3 s.
long dies_leaving_a_child(long) {
  if (::fork() == 0) {
    std::this_thread::sleep_for(3s);
    ::_exit(0);
  }
  ::_exit(7);
}

/// Stops the rank this worker serves for `ms`, then lets it go on.
long pause_my_rank(long ms) {
  const auto rank = static_cast<pid_t>(rank_pid(0));
  ::kill(rank, SIGSTOP);
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  ::kill(rank, SIGCONT);
  return ms;
}

/// The message of the WorkerLost `f` throws.
template <class F>
std::string test_thrown_lost(F f) {
  try {
    f();
  } catch (const procpool::WorkerLost& e) {
    return e.what();
  }
  FAIL("no WorkerLost");
  return {};
}

/// Stops the rank this worker serves for good.
long stop_my_rank(long) {
  ::kill(static_cast<pid_t>(rank_pid(0)), SIGSTOP);
  return 0;
}

long seed = 0;
void set_seed(long s) { seed = s; }
long seeded(long x) { return x + seed; }

std::size_t allocates(std::size_t mib) {
  std::vector<char> big(mib << 20, 'x');
  return big.size() >> 20;
}

procpool::SharedMemory make_block(long n) { return procpool::SharedMemory(static_cast<std::size_t>(n)); }

std::vector<long> iota(long n) {
  std::vector<long> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), 0L);
  return v;
}

}  // namespace

TEST_CASE("the map family gives exact results in order on MPI ranks", "[mpi]") {
  for (StartMethod method : methods) {
    INFO("start method " << static_cast<int>(method));
    procpool::Pool pool(options(method));
    const auto xs = iota(2000);
    std::vector<long> want;
    for (long x : xs) want.push_back(x * x);
    CHECK(pool.map<square>(xs) == want);
    CHECK(pool.map<square>(xs, 1) == want);
    std::vector<long> got;
    for (long v : pool.imap<square>(xs, 7)) got.push_back(v);
    CHECK(got == want);
    std::multiset<long> unordered;
    for (long v : pool.imap_unordered<square>(xs)) unordered.insert(v);
    CHECK(unordered == std::multiset<long>(want.begin(), want.end()));
    std::vector<std::tuple<long, long>> pairs{{1, 2}, {3, 4}, {5, 6}};
    CHECK(pool.starmap<add>(pairs) == std::vector<long>{3, 7, 11});
    CHECK(pool.apply<square>(9) == 81);
    CHECK(pool.map_async<square>(xs).get() == want);
  }
}

TEST_CASE("processes 0 means every CPU of every serving rank", "[mpi]") {
  procpool::Options o = options(StartMethod::forkserver, 0);
  procpool::Pool pool(o);
  CHECK(pool.processes() >= 2);
  CHECK(pool.map<square>(iota(100)).size() == 100);
}

TEST_CASE("a task's exception names the rank and host of its worker", "[mpi]") {
  for (StartMethod method : methods) {
    procpool::Pool pool(options(method));
    try {
      pool.map<fails_on_7>(iota(20), 1);
      FAIL("no exception");
    } catch (const procpool::RemoteError& e) {
      const std::string what = e.what();
      CHECK(e.type_name() == "std::invalid_argument");
      CHECK(what.find("map input #7") != std::string::npos);
      CHECK(what.find("rank ") != std::string::npos);
      CHECK(what.find(" on " + procpool::detail::mpi_wire::host_name()) != std::string::npos);
    }
    CHECK(pool.apply<square>(3) == 9);  // the pool goes on
  }
}

TEST_CASE("a segfaulting task costs that task, and the rank lives on", "[mpi]") {
  for (StartMethod method : methods) {
    procpool::Pool pool(options(method));
    try {
      pool.map<crashes_on_3>(iota(8), 1);
      FAIL("no exception");
    } catch (const procpool::WorkerLost& e) {
      const std::string what = e.what();
      CHECK(e.signal() == SIGSEGV);
      CHECK(what.find("map input #3") != std::string::npos);
      CHECK(what.find("rank ") != std::string::npos);
    }
    CHECK(pool.map<square>(iota(50), 1) == pool.map<square>(iota(50)));
  }
}

TEST_CASE("a task over its time limit fails with TaskTimeout", "[mpi]") {
  for (StartMethod method : methods) {
    procpool::Options o = options(method);
    o.task_timeout = 300ms;
    procpool::Pool pool(o);
    auto slow = pool.apply_async<sleeps>(5000);
    CHECK_THROWS_AS(slow.get(), procpool::TaskTimeout);
    CHECK(pool.apply<sleeps>(1) == 1);
  }
}

TEST_CASE("a worker that dies with large tasks queued behind it costs its task, not the rank", "[mpi]") {
  for (StartMethod method : methods) {
    procpool::Pool pool(options(method, 1));            // one worker: the large tasks wait behind the small one
    CHECK(pool.map<square>(iota(50), 1).size() == 50);  // short tasks: several in flight from now on
    std::vector<std::vector<char>> items{std::vector<char>(1), std::vector<char>(std::size_t{32} << 20),
                                         std::vector<char>(std::size_t{32} << 20)};
    auto imap = pool.imap<dies_on_small>(items, 1);
    std::vector<procpool::Result<std::size_t>> got;
    for (auto& r : imap.results()) got.push_back(std::move(r));
    REQUIRE(got.size() == 3);
    CHECK_THROWS_AS(got[0].value(), procpool::WorkerLost);
    CHECK(got[1].value() == items[1].size());  // run again elsewhere: the rank lived on
    CHECK(got[2].value() == items[2].size());
    CHECK(pool.apply<square>(5) == 25);
  }
}

TEST_CASE("a worker's end is news even while a child of it holds its pipes", "[mpi]") {
  for (StartMethod method : methods) {
    procpool::Pool pool(options(method));
    const auto t0 = std::chrono::steady_clock::now();
    try {
      pool.apply<dies_leaving_a_child>(0);
      FAIL("no exception");
    } catch (const procpool::WorkerLost& e) {
      CHECK(e.exit_code() == 7);
    }
    CHECK(std::chrono::steady_clock::now() - t0 < 2500ms);  // before the child lets go of the pipes
    CHECK(pool.apply<square>(6) == 36);
  }
}

TEST_CASE("a SharedMemory result fails its task clearly, and nothing else", "[mpi]") {
  procpool::Pool pool(options(StartMethod::forkserver));
  try {
    pool.apply<make_block>(4096);
    FAIL("no exception");
  } catch (const procpool::ProtocolError& e) {
    CHECK_THAT(e.what(), Catch::Contains("std::vector instead"));
  }
  CHECK(pool.apply<square>(4) == 16);
}

TEST_CASE("maxtasksperchild replaces workers on the ranks", "[mpi]") {
  for (StartMethod method : methods) {
    procpool::Options o = options(method);
    o.maxtasksperchild = 2;
    procpool::Pool pool(o);
    auto pids = pool.map<my_pid>(iota(20), 1);
    CHECK(std::set<long>(pids.begin(), pids.end()).size() >= 10);
  }
}

TEST_CASE("the initializer and the memory limit apply to each worker on the ranks", "[mpi]") {
  for (StartMethod method : methods) {
    procpool::Options o = options(method);
    o.initializer = procpool::initializer<set_seed>(1000L);
    o.memory_limit_per_child = std::size_t{768} << 20;
    procpool::Pool pool(o);
    CHECK(pool.map<seeded>(iota(10), 1) ==
          std::vector<long>{1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009});
    CHECK(pool.apply<allocates>(16) == 16);
    try {
      pool.apply<allocates>(1024);
      FAIL("no exception");
    } catch (const procpool::RemoteError& e) {
      CHECK(e.type_name() == "std::bad_alloc");
    }
  }
}

TEST_CASE("retries run a lost task again on another worker", "[mpi]") {
  procpool::Options o = options(StartMethod::forkserver);
  o.retries = 1;
  procpool::Pool pool(o);
  // Crashes every time: the retry fails too, and says so.
  CHECK_THROWS_AS(pool.apply<crashes_on_3>(3), procpool::WorkerLost);
  CHECK(pool.apply<crashes_on_3>(4) == 4);
}

TEST_CASE("pools on MPI ranks follow one another", "[mpi]") {
  for (int k = 0; k < 4; ++k) {
    procpool::Pool pool(options(methods[k % 3]));
    CHECK(pool.apply<add>(k, 1) == k + 1);
    if (k % 2 == 0) {
      pool.close();
      pool.join();
    }
  }
}

TEST_CASE("large payloads cross in pieces, intact", "[mpi]") {
  procpool::Options o = options(StartMethod::forkserver);
  o.max_message_bytes = std::size_t{1} << 31;
  procpool::Pool pool(o);
  // More than one MPI message's worth on its way to the rank.
  std::vector<char> big(std::size_t{80} << 20);
  static_assert(procpool::detail::mpi_wire::max_piece < (std::size_t{80} << 20));
  for (std::size_t k = 0; k < big.size(); ++k) big[k] = static_cast<char>(k * 131 + k / 977);
  auto back = pool.map<echo>(std::vector<std::vector<char>>{big, big, std::vector<char>(1, 'x')}, 1);
  REQUIRE(back.size() == 3);
  CHECK(back[0] == big);
  CHECK(back[1] == big);
  CHECK(back[2] == std::vector<char>(1, 'x'));
}

TEST_CASE("idle serving ranks use under 2 % of a core", "[mpi]") {
  procpool::Pool pool(options(StartMethod::forkserver));
  auto ranks = pool.map<rank_pid>(iota(40), 1);
  std::set<long> pids(ranks.begin(), ranks.end());
  REQUIRE(!pids.empty());
  std::this_thread::sleep_for(300ms);  // past the short waits after the last task
  std::vector<double> before;
  for (long pid : pids) before.push_back(cpu_seconds(static_cast<pid_t>(pid)));
  const auto t0 = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(3s);
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::size_t k = 0;
  for (long pid : pids) {
    const double share = (cpu_seconds(static_cast<pid_t>(pid)) - before[k++]) / wall;
    INFO("rank pid " << pid << " used " << share * 100 << " % of a core");
    CHECK(share < 0.02);
  }
}

long first_byte(procpool::SharedMemory block) { return block.as<char>()[0]; }

TEST_CASE("a SharedMemory argument fails its task clearly, and nothing else", "[mpi]") {
  procpool::Pool pool(options(StartMethod::forkserver));
  procpool::SharedMemory block(4096);
  block.as<char>()[0] = 5;
  try {
    pool.apply<first_byte>(block);
    FAIL("no exception");
  } catch (const procpool::ProtocolError& e) {
    CHECK_THAT(e.what(), Catch::Contains("std::vector instead"));
  }
  CHECK(pool.apply<square>(4) == 16);
}

void read_block(procpool::SharedMemory block) { (void)block.as<char>()[0]; }

TEST_CASE("a SharedMemory in an initializer's arguments is refused when the pool is made", "[mpi]") {
  // Workers on rank 0's host mapped it, and those on other hosts failed.
  procpool::SharedMemory block(4096);
  procpool::Options o = options(StartMethod::forkserver);
  o.initializer = procpool::initializer<read_block>(block);
  CHECK_THROWS_WITH(procpool::Pool(o), Catch::Contains("initializer's arguments hold a procpool::SharedMemory"));
}

TEST_CASE("worker output options that need the parent are refused clearly", "[mpi]") {
  procpool::Options o = options(StartMethod::forkserver);
  o.worker_output = procpool::WorkerOutput::prefixed;
  CHECK_THROWS_WITH(procpool::Pool(o), Catch::Contains("not available on MPI ranks"));
}

// ---- run on their own by ctest ----------------------------------------------------------

TEST_CASE("a killed rank fails its tasks with WorkerLost, and the pool goes on", "[.lost]") {
  procpool::mpi::Settings settings;
  settings.lost_after = 2s;
  procpool::Options o;
  o.processes = 2;
  o.backend = mode() == "spawn" ? procpool::mpi::spawn(2, settings) : procpool::mpi::world(settings);
  procpool::Pool pool(o);
  auto where = pool.map<rank_pid>(iota(20), 1);
  REQUIRE(std::set<long>(where.begin(), where.end()).size() == 2);  // a worker on each rank
  const auto t0 = std::chrono::steady_clock::now();
  auto killer = pool.apply_async<kill_my_rank>(0);
  try {
    killer.get();
    FAIL("no exception");
  } catch (const procpool::WorkerLost& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).find("lost") != std::string::npos);
    CHECK(std::string(e.what()).find("killed by signal") == std::string::npos);  // nothing says so
    CHECK(e.signal() == 0);
  }
  CHECK(std::chrono::steady_clock::now() - t0 < 8s);
  // The other rank serves on.
  CHECK(pool.map<square>(iota(100), 1) == pool.map<square>(iota(100), 50));
}

TEST_CASE("a rank lost while only stopped does not keep the program from ending", "[.paused]") {
  procpool::mpi::Settings settings;
  settings.lost_after = 1s;
  procpool::Options o;
  o.processes = 2;
  o.backend = procpool::mpi::world(settings);
  procpool::Pool pool(o);
  auto where = pool.map<rank_pid>(iota(20), 1);
  REQUIRE(std::set<long>(where.begin(), where.end()).size() == 2);
  // The paused rank is lost after 1 s; its task fails, and it wakes at 3 s.
  CHECK_THROWS_AS(pool.apply<pause_my_rank>(3000), procpool::WorkerLost);
  CHECK(pool.map<square>(iota(100), 1) == pool.map<square>(iota(100), 50));
  std::this_thread::sleep_for(3s);  // it is awake again: exit must still end it
}

TEST_CASE("ranks lost while sending large results still let the program end", "[.lost_sending]") {
  // Moving a 64 MiB piece over TCP takes longer than lost_after: rank 0
  // takes healthy ranks for lost while they still send. Exit must take in
  // what they send, so they can leave MPI, and not wait for ever.
  procpool::mpi::Settings settings;
  settings.lost_after = 100ms;
  procpool::Options o;
  o.processes = 2;
  o.backend = procpool::mpi::world(settings);
  procpool::Pool pool(o);
  std::size_t lost = 0;
  for (std::size_t mib : {50, 200, 300}) {
    const std::vector<char> big(mib << 20, 'x');
    try {
      const std::vector<char> back = pool.apply<echo>(big);
      CHECK(back == big);  // intact, if it comes at all
    } catch (const procpool::Error&) {
      ++lost;  // lost on the way: what matters is that the program ends
    }
  }
  try {
    const std::vector<std::vector<char>> four(4, std::vector<char>(std::size_t{100} << 20, 'y'));
    const std::vector<std::vector<char>> back = pool.map<echo>(four, 1);
    CHECK(back == four);
  } catch (const procpool::Error&) {
    ++lost;
  }
  CHECK(lost > 0);  // or this test tests nothing
}

TEST_CASE("a rank that stops answering for good ends the job at exit, with a message", "[.stopped]") {
  procpool::mpi::Settings settings;
  settings.lost_after = 1s;
  procpool::Options o;
  o.processes = 2;
  o.backend = procpool::mpi::world(settings);
  procpool::Pool pool(o);
  auto where = pool.map<rank_pid>(iota(20), 1);
  REQUIRE(std::set<long>(where.begin(), where.end()).size() == 2);
  CHECK_THROWS_AS(pool.apply<stop_my_rank>(0), procpool::WorkerLost);
  CHECK(pool.map<square>(iota(100), 1) == pool.map<square>(iota(100), 50));
}

TEST_CASE("a spawned rank that stops answering for good does not keep the job alive at exit", "[.stopped_spawn]") {
  procpool::mpi::Settings settings;
  settings.lost_after = 1s;
  procpool::Options o;
  o.processes = 2;
  o.backend = procpool::mpi::spawn(2, settings);
  procpool::Pool pool(o);
  auto where = pool.map<rank_pid>(iota(20), 1);
  REQUIRE(std::set<long>(where.begin(), where.end()).size() == 2);
  auto lost = test_thrown_lost([&] { pool.apply<stop_my_rank>(0); });
  CHECK_THAT(lost, Catch::Contains("spawned rank "));
  CHECK(pool.map<square>(iota(100), 1) == pool.map<square>(iota(100), 50));
}

TEST_CASE("a negative spawn_timeout is refused", "[mpi]") {
  procpool::mpi::Settings settings;
  settings.spawn_timeout = -1ms;
  CHECK_THROWS_WITH(procpool::Pool({.backend = procpool::mpi::spawn(1, settings)}),
                    Catch::Contains("Settings::spawn_timeout is -1 ms; use 0 for no limit"));
}

TEST_CASE("a lost_after too short to hear from a rank in is refused", "[mpi]") {
  procpool::mpi::Settings settings;
  settings.lost_after = 0ms;
  procpool::Options o;
  o.backend = procpool::mpi::spawn(1, settings);
  try {
    procpool::Pool pool(o);
    FAIL("a pool was made");
  } catch (const procpool::Error& e) {
    CHECK_THAT(e.what(), Catch::Contains("Settings::lost_after is 0 ms"));
  }
}

namespace {
std::optional<procpool::Pool> global_pool;  // destroyed after MPI is finalized
}

TEST_CASE("the hosts of spawn_info are read as Open MPI reads them", "[mpi]") {
  const std::string file = "/tmp/procpool_hosts_" + std::to_string(::getpid());
  std::ofstream(file) << "# comment\nnode3 slots=2\r\n\n  user@node4   # the fourth\n10.0.0.5 max_slots=1\n"
                         "^node5\nrank 0=node6 slot=0\nnode1\n";
  const auto hosts = procpool::detail::spawn_hosts(
      {{"host", "node1,node2:4, +n1,+e:2"}, {"hostfile", file}, {"add-host", "node7"}, {"map_by", "node9"}});
  std::remove(file.c_str());
  CHECK(hosts == std::vector<std::string>{"node1", "node2", "node3", "node4", "10.0.0.5", "node7"});
}

TEST_CASE("a spawn_info host this machine cannot resolve is refused before spawning", "[.unknown_host]") {
  procpool::mpi::Settings settings;
  settings.spawn_info = {{"host", "localhost,procpool-no-such-host.invalid:2"}};
  settings.spawn_timeout = 20s;  // were it not refused, the watchdog would end the test
  try {
    procpool::Pool pool({.processes = 1, .backend = procpool::mpi::spawn(1, settings)});
    FAIL("a pool was made");
  } catch (const procpool::Error& e) {
    CHECK_THAT(e.what(), Catch::Contains("host \"procpool-no-such-host.invalid\" in Settings::spawn_info"));
  }
  // Nothing was spawned: a spawn after it works.
  procpool::Pool pool({.processes = 1, .backend = procpool::mpi::spawn(1)});
  CHECK(pool.apply<square>(5) == 25);
}

TEST_CASE("a spawn that cannot start its ranks ends the program after spawn_timeout", "[.unreachable]") {
  // Handed to MPI unchecked, the name makes ssh fail: Open MPI prints why,
  // and MPI_Comm_spawn never returns.
  procpool::mpi::Settings settings;
  settings.spawn_info = {{"host", "procpool-no-such-host.invalid"}};
  settings.resolve_hosts = false;
  settings.spawn_timeout = 3s;
  procpool::Pool pool({.processes = 1, .backend = procpool::mpi::spawn(1, settings)});
  FAIL("a pool was made");
}

TEST_CASE("a pool still alive when the program exits lets its ranks go", "[.static]") {
  global_pool.emplace(options(StartMethod::forkserver));
  CHECK(global_pool->apply<square>(7) == 49);
}

TEST_CASE("a pool alive when MPI is finalized fails its running task saying so, then refuses calls", "[.finalized]") {
  // The task's error said its worker was killed by SIGKILL and replaced,
  // and the next call threw a plain Error.
  global_pool.emplace(options(StartMethod::forkserver));
  auto running = global_pool->apply_async<sleeps>(20000L);
  CHECK(global_pool->apply<square>(3) == 9);  // the pool's workers are up; the sleeper's too, soon
  std::this_thread::sleep_for(1s);
  MPI_Finalize();
  try {
    (void)running.get();
    FAIL("it returned");
  } catch (const procpool::WorkerLost& e) {
    CHECK_THAT(e.what(), Catch::Contains("which MPI_Finalize let go"));
    CHECK_THAT(e.what(), !Catch::Contains("replaced"));
  }
  try {
    (void)global_pool->apply<square>(2);
    FAIL("it returned");
  } catch (const procpool::PoolNotRunning& e) {
    CHECK_THAT(e.what(), Catch::Contains("MPI ranks were let go"));
  }
}

std::set<long> ranks_of(procpool::Pool& pool) {
  auto pids = pool.map<rank_pid>(iota(40), 1);
  return {pids.begin(), pids.end()};
}

bool gone(long pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  return text.empty() || text.substr(text.rfind(')') + 2, 1) == "Z";
}

TEST_CASE("spawned ranks wait for the next spawn pool, or leave with theirs", "[.spawn]") {
  std::set<long> first, second;
  {
    procpool::Pool pool({.processes = 2, .backend = procpool::mpi::spawn(2)});
    first = ranks_of(pool);
  }
  {
    procpool::Pool pool({.processes = 2, .backend = procpool::mpi::spawn(2)});
    second = ranks_of(pool);
  }
  CHECK(first.size() == 2);
  CHECK(first == second);  // the same ranks served both
  std::set<long> own;
  {
    procpool::mpi::Settings settings;
    settings.reuse_ranks = false;
    procpool::Pool pool({.processes = 2, .backend = procpool::mpi::spawn(2, settings)});
    own = ranks_of(pool);
    CHECK(own != first);  // new ones: the idle ranks are kept for pools that reuse
  }
  for (long pid : own) CHECK(gone(pid));  // they left with their pool
  for (long pid : first) CHECK(!gone(pid));
}

long worker_cpus(long) { return static_cast<long>(procpool::cpu_count()); }

TEST_CASE("a spawned rank may run on every CPU, and with processes = 0 starts a worker for each", "[.unbound]") {
  // Open MPI binds the ranks it spawns, when fewer than the cores, to a
  // core each: a rank's workers all ran on it, and processes = 0 started one.
  procpool::Pool pool({.backend = procpool::mpi::spawn(1)});
  CHECK(pool.apply<worker_cpus>(0L) == static_cast<long>(procpool::cpu_count()));
  std::set<long> pids;
  for (long pid : pool.map<sleeps_then_pid>(std::vector<long>(8, 200), 1)) pids.insert(pid);
  CHECK(pids.size() == procpool::cpu_count());
}

TEST_CASE("a killed rank without recovery ends the job", "[.abort]") {
  procpool::Pool pool(options(StartMethod::forkserver));
  pool.apply<kill_my_rank>(0);
  FAIL("the job was not ended");
}

TEST_CASE("a rank running another build is refused clearly", "[.mismatch]") {
  CHECK_THROWS_WITH(procpool::Pool(options(StartMethod::forkserver)), Catch::Contains("another build"));
}

int main(int argc, char** argv) {
  procpool::mpi::init(argc, argv);
  return Catch::Session().run(argc, argv);
}

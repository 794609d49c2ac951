/// @file
/// procpool on MPI ranks: procpool::mpi::init, procpool::mpi::world(),
/// procpool::mpi::spawn(n). Link the CMake target procpool::mpi. See
/// docs/mpi.md.
#pragma once

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "detail/mpi_link.hpp"
#include "detail/mpi_serve.hpp"
#include "detail/mpi_spawn.hpp"
#include "init.hpp"
#include "procpool.hpp"

namespace procpool::mpi {

/// How a pool on MPI ranks watches them.
struct Settings {
  /// A serving rank not heard from for this long is lost: its workers'
  /// tasks fail with `WorkerLost` (or are retried, `Options::retries`), and
  /// the pool goes on with the other ranks. Each rank says it is there ten
  /// times in this period.
  std::chrono::milliseconds lost_after{5000};
  /// For spawn(): MPI_Info keys for MPI_Comm_spawn, such as {"host",
  /// "node1,node2"} or {"hostfile", "hosts.txt"}; added to Open MPI's
  /// {"map_by", "slot:OVERSUBSCRIBE"} and {"bind_to", "none"}, which they
  /// may replace.
  std::vector<std::pair<std::string, std::string>> spawn_info{};
  /// For spawn(): when the pool is destroyed, its ranks wait, idle, for the
  /// next spawn() pool with the same number of ranks and spawn_info, and
  /// leave when MPI is finalized (at the program's exit). false: they leave
  /// with the pool. Open MPI 4.1 can hang for ever in MPI_Comm_spawn while
  /// the ranks of an earlier spawn exit: a program that makes spawn() pools
  /// one after another spawns only once this way.
  bool reuse_ranks = true;
  /// For spawn(): how long MPI_Comm_spawn may take. Open MPI waits for ever
  /// when it cannot start a rank (a host that cannot be reached): past this
  /// the program ends with a message and MPI_Abort. 0: no limit.
  std::chrono::milliseconds spawn_timeout{60000};
  /// For spawn(): a host in spawn_info that this machine cannot resolve is
  /// refused with an Error before anything is spawned. false: hand every
  /// name to MPI as it is (names that only the launcher knows, such as ssh
  /// aliases).
  bool resolve_hosts = true;
};

namespace detail {

struct State {
  std::mutex mutex;
  bool initialized = false;
  bool own_mpi = false;  // init() called MPI_Init_thread
  pid_t init_pid = 0;    // the process that ran init()
  // At exit, finish_world() is in MPI_Finalize (1), or it returned (2).
  std::atomic<int> exit_finalize{0};
  int provided = 0;  // MPI's thread level
  MPI_Comm world = MPI_COMM_NULL;
  int world_size = 1;
  std::vector<std::string> args;  // argv[1..], for spawned ranks
  std::atomic<bool> world_busy{false};
  std::vector<int> world_lost;                               // world ranks a pool lost: left out of later pools
  std::map<int, std::pair<std::string, pid_t>> world_ranks;  // host and pid of each, once known
  /// Ranks spawn() started and a pool let go of, waiting for the next
  /// (Settings::reuse_ranks), by the spawn that made them.
  struct Idle {
    std::size_t ranks;
    std::vector<std::pair<std::string, std::string>> info;
    MPI_Comm inter;
    std::vector<std::pair<std::string, pid_t>> processes;  // host and pid of each rank
  };
  std::vector<Idle> idle;
  /// Spawned ranks a pool took for lost ("spawned rank 1 on node3") and,
  /// where they run on this host, their pids: at exit they are killed, or
  /// their job could not end (a stopped one keeps the others in
  /// MPI_Comm_disconnect, and mpirun waiting, for ever).
  std::vector<std::pair<std::string, pid_t>> lost_spawned;
};

inline State& state() {
  static auto* s = new State;  // never destroyed: used at exit
  return *s;
}

inline void need_init(const char* what) {
  State& s = state();
  if (!s.initialized) {
    throw Error(
        fmt::format("procpool: {} needs procpool::mpi::init(argc, argv) as the first line of main(), and "
                    "a pool made after it: not a Pool at namespace scope, which is made before main() (hold "
                    "it in a std::optional and emplace it in main())",
                    what));
  }
  if (s.provided < MPI_THREAD_MULTIPLE) {
    throw Error(
        fmt::format("procpool: {} needs MPI_THREAD_MULTIPLE, and this MPI gives only level {}", what, s.provided));
  }
}

inline void check_options(const Options& options) {
  if (options.worker_output != WorkerOutput::inherit || options.on_worker_output) {
    throw Error(
        "procpool: Options::worker_output and Options::on_worker_output are not available on MPI ranks: a worker's "
        "output goes to its rank's stdout and stderr, which mpirun forwards (use mpirun's --tag-output to tell "
        "ranks apart)");
  }
  // Workers on another host could not map it; on this one they would, and
  // a program tested on one machine would fail on many.
  if (!procpool::detail::InitializerAccess::shares(options.initializer).empty()) {
    throw Error(
        "procpool: the initializer's arguments hold a procpool::SharedMemory block, which cannot reach workers on "
        "MPI ranks (they may run on other hosts); pass the data as a std::vector instead");
  }
}

/// @throws Error a lost_after too short to hear from a rank in, or a
/// negative spawn_timeout.
inline void check_settings(const Settings& settings) {
  if (settings.lost_after < std::chrono::milliseconds(100)) {
    throw Error(fmt::format(
        "procpool: procpool::mpi::Settings::lost_after is {} ms: a rank not heard from for that long is taken for "
        "lost, so it must be at least 100 ms (5000 by default; a longer one waits longer for a rank that stopped)",
        settings.lost_after.count()));
  }
  if (settings.spawn_timeout < std::chrono::milliseconds(0)) {
    throw Error(fmt::format("procpool: procpool::mpi::Settings::spawn_timeout is {} ms; use 0 for no limit",
                            settings.spawn_timeout.count()));
  }
}

/// Tells spawned ranks to leave MPI and exit, taking in what they still
/// send. Waits for the disconnect only when every rank answered and none is
/// `lost` (a lost rank cannot take part; the others then stay until this
/// program finishes MPI). Returns the ranks that did not answer.
inline std::vector<int> let_go_spawned(MPI_Comm inter, const std::vector<int>& lost, bool finalizing) {
  int size = 0;
  MPI_Comm_remote_size(inter, &size);
  std::vector<int> ranks;
  for (int r = 0; r < size; ++r) {
    if (finalizing || std::find(lost.begin(), lost.end(), r) == lost.end()) ranks.push_back(r);
  }
  const std::vector<int> left = ::procpool::detail::mpi_wire::finish_ranks(
      inter, ranks, std::chrono::steady_clock::now() + ::procpool::detail::mpi_wire::finish_wait);
  if (lost.empty() && left.empty()) {
    MPI_Comm_disconnect(&inter);
  } else {
    MPI_Comm_free(&inter);
  }
  return left;
}

/// Waits (up to 10 s) until ranks let go of on this host have exited, and
/// 300 ms for those elsewhere, so none outlives the program that spawned it.
inline void wait_until_gone(const std::vector<std::pair<std::string, pid_t>>& ranks) {
  const std::string here = ::procpool::detail::mpi_wire::host_name();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  bool remote = false;
  for (const auto& [host, pid] : ranks) {
    if (host != here) {
      remote = true;
      continue;
    }
    while (::kill(pid, 0) == 0 && std::chrono::steady_clock::now() < deadline) ::usleep(1000);
  }
  if (remote) ::usleep(300'000);
}

/// A rank that did not answer `finish`: its name, and its pid where it runs
/// on this host (0 elsewhere).
struct Silent {
  std::string name;
  pid_t here = 0;
};

/// MPI_Finalize waits for every rank, and Open MPI's for a rank that stopped
/// answering too, for ever. Where ranks did not answer `finish` and MPI is
/// finalized at exit, a thread steps in if MPI_Finalize has not returned 5 s
/// later: it kills those on this host, and 5 s after that (or at once if
/// none is here) ends the job with MPI_Abort. (MPI_Finalized says true as
/// soon as MPI_Finalize has begun: finish_world says when it returned.)
inline void watch_finalize(std::vector<Silent> silent) {
  if (state().exit_finalize != 1) return;
  std::thread([silent = std::move(silent)] {
    std::string names = silent.front().name;
    for (std::size_t k = 1; k < silent.size(); ++k) names += ", " + silent[k].name;
    // Waits 5 s; then, if MPI_Finalize still has not returned, says what it does about it.
    auto still_waiting = [&](const char* action) {
      std::this_thread::sleep_for(std::chrono::seconds(5));
      if (state().exit_finalize != 1) return false;
      std::fprintf(stderr,
                   "procpool: MPI_Finalize is waiting for %s, which stopped answering and was taken for lost; %s\n",
                   names.c_str(), action);
      return true;
    };
    if (std::any_of(silent.begin(), silent.end(), [](const Silent& r) { return r.here > 0; })) {
      if (!still_waiting("killing what of it runs on this host")) return;
      for (const Silent& r : silent) {
        if (r.here > 0) ::kill(r.here, SIGKILL);
      }
    }
    if (still_waiting("MPI_Abort ends the job")) MPI_Abort(MPI_COMM_WORLD, 1);
  }).detach();
}

/// Run by MPI_Finalize on rank 0 (an attribute of MPI_COMM_SELF, deleted
/// first thing in MPI_Finalize), whoever calls it: the pools still alive let
/// their ranks go, then every serving rank of the world is told to finish,
/// lost ones too (one that was only slow must not keep the job alive), and
/// what they still send is taken in until each answers (at most
/// mpi_wire::finish_wait: one that stopped answers never).
inline int on_finalize(MPI_Comm, int, void*, void*) {
  if (::getpid() != state().init_pid) return MPI_SUCCESS;
  ::procpool::detail::MpiTransport::shutdown_all();
  State& s = state();
  std::vector<Silent> silent;
  for (auto& idle : s.idle) {
    const std::vector<int> left = let_go_spawned(idle.inter, {}, true);
    for (int r : left) silent.push_back({fmt::format("spawned rank {}", r)});
    if (left.empty()) wait_until_gone(idle.processes);
  }
  s.idle.clear();
  // Spawned ranks a pool took for lost: killed here if on this host (one
  // still running would keep its job alive); MPI_Abort for the others, if
  // MPI_Finalize waits for them.
  std::vector<std::pair<std::string, pid_t>> lost_spawned;
  {
    std::lock_guard lock(s.mutex);
    lost_spawned.swap(s.lost_spawned);
  }
  for (const auto& [name, pid] : lost_spawned) {
    if (pid > 0) {
      std::fprintf(stderr, "procpool: %s was taken for lost; it is killed at exit, or its job could not end\n",
                   name.c_str());
      ::kill(pid, SIGKILL);
    } else {
      silent.push_back({name});
    }
  }
  std::vector<int> ranks(static_cast<std::size_t>(std::max(s.world_size - 1, 0)));
  std::iota(ranks.begin(), ranks.end(), 1);
  const auto deadline = std::chrono::steady_clock::now() + ::procpool::detail::mpi_wire::finish_wait;
  const std::string host = ::procpool::detail::mpi_wire::host_name();
  for (int r : ::procpool::detail::mpi_wire::finish_ranks(s.world, ranks, deadline)) {
    std::lock_guard lock(s.mutex);
    auto it = s.world_ranks.find(r);
    const bool here = it != s.world_ranks.end() && it->second.first == host;
    silent.push_back({fmt::format("rank {}", r), here ? it->second.second : 0});
  }
  if (!silent.empty()) watch_finalize(std::move(silent));
  return MPI_SUCCESS;
}

/// At exit on rank 0: leaves MPI, if init() entered it.
inline void finish_world() {
  if (::getpid() != state().init_pid) return;  // a child made by fork(): MPI is its parent's
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized != 0 || !state().own_mpi) return;
  state().exit_finalize = 1;
  MPI_Finalize();
  state().exit_finalize = 2;
}

class WorldBackend final : public ::procpool::detail::BackendImpl {
 public:
  explicit WorldBackend(Settings settings) : settings_(std::move(settings)) {}
  std::unique_ptr<::procpool::detail::Transport> make_transport(const Options& options) const override {
    need_init("procpool::mpi::world()");
    check_options(options);
    check_settings(settings_);
    State& s = state();
    if (s.world_size < 2) {
      throw Error(
          "procpool: procpool::mpi::world() has no ranks to serve: this program runs as one MPI rank. Start it with "
          "`mpirun -np N` (N >= 2; rank 0 runs main, the others serve), or use procpool::mpi::spawn(n)");
    }
    if (s.world_busy.exchange(true)) {
      throw Error("procpool: another pool already runs on procpool::mpi::world(); destroy it before making the next");
    }
    try {
      ::procpool::detail::MpiHub::Settings hub;
      hub.comm = s.world;
      hub.lost_after = settings_.lost_after;
      for (int r = 1; r < s.world_size; ++r) {
        if (std::find(s.world_lost.begin(), s.world_lost.end(), r) == s.world_lost.end()) hub.ranks.push_back(r);
      }
      if (hub.ranks.empty()) throw Error("procpool: every serving rank of procpool::mpi::world() was lost");
      return std::make_unique<::procpool::detail::MpiTransport>(std::move(hub), options, [](auto& h) {
        State& st = state();
        for (int r : h.lost_ranks()) st.world_lost.push_back(r);
        {
          std::lock_guard lock(st.mutex);
          for (auto& [r, where] : h.whereabouts()) st.world_ranks[r] = where;
        }
        st.world_busy = false;
      });
    } catch (...) {
      s.world_busy = false;
      throw;
    }
  }

 private:
  Settings settings_;
};

class SpawnBackend final : public ::procpool::detail::BackendImpl {
 public:
  SpawnBackend(std::size_t ranks, Settings settings) : ranks_(ranks), settings_(std::move(settings)) {}
  std::unique_ptr<::procpool::detail::Transport> make_transport(const Options& options) const override {
    need_init("procpool::mpi::spawn()");
    check_options(options);
    check_settings(settings_);
    if (ranks_ == 0 || ranks_ > INT_MAX) throw Error("procpool: procpool::mpi::spawn(n) needs 1 <= n");
    MPI_Comm inter = take_idle();
    if (inter == MPI_COMM_NULL) {
      if (settings_.resolve_hosts) ::procpool::detail::check_spawn_hosts(ranks_, settings_.spawn_info);
      inter = spawn_ranks();
    }
    ::procpool::detail::MpiHub::Settings hub;
    hub.comm = inter;
    hub.lost_after = settings_.lost_after;
    hub.rank_name = "spawned rank";
    for (std::size_t r = 0; r < ranks_; ++r) hub.ranks.push_back(static_cast<int>(r));
    try {
      return std::make_unique<::procpool::detail::MpiTransport>(
          std::move(hub), options, [inter, ranks = ranks_, settings = settings_](auto& h) {
            // Healthy ranks wait for the next pool, if asked to.
            if (settings.reuse_ranks && h.lost_ranks().empty()) {
              std::lock_guard lock(state().mutex);
              state().idle.push_back(State::Idle{ranks, settings.spawn_info, inter, h.processes()});
              return;
            }
            const std::vector<int> lost = h.lost_ranks();
            // With a rank lost, the others cannot finish MPI: no waiting for them.
            std::vector<int> left = let_go_spawned(inter, lost, false);
            if (left.empty() && lost.empty()) {
              wait_until_gone(h.processes());
              return;
            }
            left.insert(left.end(), lost.begin(), lost.end());
            const auto whereabouts = h.whereabouts();
            const std::string here = ::procpool::detail::mpi_wire::host_name();
            std::lock_guard lock(state().mutex);
            for (int r : left) {
              const auto it = whereabouts.find(r);
              const std::string host = it != whereabouts.end() ? it->second.first : "an unknown host";
              const pid_t pid = it != whereabouts.end() && host == here ? it->second.second : 0;
              state().lost_spawned.emplace_back(fmt::format("spawned rank {} on {}", r, host), pid);
            }
          });
    } catch (...) {
      // It could not open (a rank did not answer): no waiting on any.
      std::vector<int> all(ranks_);
      std::iota(all.begin(), all.end(), 0);
      let_go_spawned(inter, all, false);
      throw;
    }
  }

 private:
  /// Idle ranks of an earlier spawn() like this one, or MPI_COMM_NULL.
  MPI_Comm take_idle() const {
    if (!settings_.reuse_ranks) return MPI_COMM_NULL;
    std::lock_guard lock(state().mutex);
    auto& idle = state().idle;
    for (auto it = idle.begin(); it != idle.end(); ++it) {
      if (it->ranks != ranks_ || it->info != settings_.spawn_info) continue;
      MPI_Comm inter = it->inter;
      idle.erase(it);
      return inter;
    }
    return MPI_COMM_NULL;
  }

  MPI_Comm spawn_ranks() const {
    char exe[PATH_MAX] = {};
    const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0) throw Error("procpool: procpool::mpi::spawn() cannot find this program's file (/proc/self/exe)");
    State& s = state();
    std::vector<char*> argv;
    for (auto& a : s.args) argv.push_back(a.data());
    argv.push_back(nullptr);
    std::string keys;
    for (const auto& [key, value] : settings_.spawn_info) {
      keys += fmt::format("{}{}={}", keys.empty() ? "" : ", ", key, value);
    }
    MPI_Comm inter = MPI_COMM_NULL;
    std::vector<int> codes(ranks_, MPI_SUCCESS);
    MPI_Comm_set_errhandler(MPI_COMM_SELF, MPI_ERRORS_RETURN);
    int rc = MPI_SUCCESS;
    MPI_Info info;
    {
      const ::procpool::detail::SpawnWatch watch(
          settings_.spawn_timeout,
          fmt::format("procpool: procpool::mpi::spawn({}) has not started its ranks after {} ms (spawn_info: {}). "
                      "MPI_Comm_spawn waits for ever where MPI cannot start a rank, such as on a host it cannot "
                      "reach (MPI may have said why above). Ending the program; Settings::spawn_timeout sets this "
                      "limit.",
                      ranks_, settings_.spawn_timeout.count(), keys.empty() ? "none" : keys));
      MPI_Info_create(&info);
      MPI_Info_set(info, "map_by", "slot:OVERSUBSCRIBE");
      // Unbound: a rank's workers run on every CPU it may use, and processes
      // = 0 counts them (Open MPI binds 2 spawned ranks or fewer to a core each).
      MPI_Info_set(info, "bind_to", "none");
      for (const auto& [key, value] : settings_.spawn_info) MPI_Info_set(info, key.c_str(), value.c_str());
      rc = MPI_Comm_spawn(exe, argv.data(), static_cast<int>(ranks_), info, 0, MPI_COMM_SELF, &inter, codes.data());
    }
    MPI_Info_free(&info);
    if (rc != MPI_SUCCESS) {
      char text[MPI_MAX_ERROR_STRING] = {};
      int len = 0;
      MPI_Error_string(rc, text, &len);
      throw Error(fmt::format("procpool: procpool::mpi::spawn({}) could not start {}: {}", ranks_, exe, text));
    }
    MPI_Comm_set_errhandler(inter, MPI_ERRORS_RETURN);
    return inter;
  }

  std::size_t ranks_;
  Settings settings_;
};

}  // namespace detail

/**
 * The first line of `main` in a program that runs pools on MPI ranks, in
 * place of `procpool::init`: `procpool::mpi::init(argc, argv);`.
 *
 * Calls `procpool::init` (a process procpool started to become a worker
 * never returns from it), then `MPI_Init_thread` with MPI_THREAD_MULTIPLE
 * unless MPI is initialized already (allowed only where `procpool::init`
 * ran before MPI did; otherwise it throws procpool::Error, since worker
 * processes re-run `main`). Then, on every rank but rank 0 of
 * `MPI_COMM_WORLD`, and in every rank `procpool::mpi::spawn` started, it
 * serves pools and never returns: it leaves MPI and exits when rank 0's
 * program exits. On rank 0 it returns, and MPI is finalized at exit: do not
 * call MPI_Finalize yourself.
 */
inline void init(int argc, char** argv) {
  const bool core_first = ::procpool::detail::init_called();
  ::procpool::init(argc, argv);
  detail::State& s = detail::state();
  std::lock_guard lock(s.mutex);
  if (s.initialized) return;
  int ready = 0;
  MPI_Initialized(&ready);
  if (ready != 0 && !core_first) {
    // A worker re-runs main() and would enter MPI first too, as an MPI process it is not.
    throw Error(
        "procpool: MPI was initialized before procpool::mpi::init(argc, argv). Make procpool::mpi::init the first "
        "line of main() in place of MPI_Init, or call procpool::init(argc, argv) before MPI_Init");
  }
  for (int k = 1; k < argc && argv != nullptr && argv[k] != nullptr; ++k) s.args.emplace_back(argv[k]);
  if (ready == 0) {
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &s.provided) != MPI_SUCCESS) {
      throw Error("procpool: MPI_Init_thread failed");
    }
    s.own_mpi = true;
  } else {
    MPI_Query_thread(&s.provided);
  }
  MPI_Comm parent = MPI_COMM_NULL;
  MPI_Comm_get_parent(&parent);
  if (parent != MPI_COMM_NULL) {
    MPI_Comm_set_errhandler(parent, MPI_ERRORS_RETURN);
    ::procpool::detail::RankServer(parent, 0, true).run();
  }
  MPI_Comm_dup(MPI_COMM_WORLD, &s.world);
  MPI_Comm_set_errhandler(s.world, MPI_ERRORS_RETURN);
  int rank = 0;
  MPI_Comm_rank(s.world, &rank);
  MPI_Comm_size(s.world, &s.world_size);
  if (rank != 0) ::procpool::detail::RankServer(s.world, 0, false).run();
  int key = MPI_KEYVAL_INVALID;
  MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, detail::on_finalize, &key, nullptr);
  MPI_Comm_set_attr(MPI_COMM_SELF, key, nullptr);
  s.initialized = true;
  s.init_pid = ::getpid();
  std::atexit(detail::finish_world);
}

/**
 * Workers on the ranks of `mpirun -np N` (or `srun`): rank 0 runs `main`
 * and the pool; ranks 1..N-1 each start worker processes of their own.
 * `Options::processes` counts worker processes over all of them; 0 means
 * every CPU of every serving rank. One such pool at a time.
 */
inline Backend world(Settings settings = {}) {
  return Backend(std::make_shared<detail::WorldBackend>(std::move(settings)));
}

/**
 * Workers on `ranks` new MPI ranks, which the pool starts (MPI_Comm_spawn
 * of this program's binary) and lets go of when it is destroyed. Works in a
 * program run on its own or under `mpirun -np 1`.
 */
inline Backend spawn(std::size_t ranks, Settings settings = {}) {
  return Backend(std::make_shared<detail::SpawnBackend>(ranks, std::move(settings)));
}

}  // namespace procpool::mpi

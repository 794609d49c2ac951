// procpool - guards around MPI_Comm_spawn (procpool::mpi::spawn). Open MPI
// 4.1 waits for ever where it cannot start a rank: a host name that does
// not resolve is refused before the spawn, and a spawn that never returns
// ends the program instead of hanging it.
#pragma once

#include <mpi.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "mpi_wire.hpp"
#include "thread.hpp"

namespace procpool::detail {

using SpawnInfo = std::vector<std::pair<std::string, std::string>>;

/// The host names `info` hands Open MPI, each once: the lists of "host" and
/// "add-host" ("node1,node2:4"), and the host of each line of the files
/// "hostfile" and "add-hostfile" ("user@node3 slots=2"). As Open MPI reads
/// them, a name ends at its first ':' and starts after an '@'. Exclusions
/// ("^node5"), relative nodes ("+n1") and rankfile lines ("rank 0=node6")
/// are left out.
inline std::vector<std::string> spawn_hosts(const SpawnInfo& info) {
  std::vector<std::string> hosts;
  auto add = [&](std::string name) {
    if (const auto at = name.find('@'); at != std::string::npos) name.erase(0, at + 1);
    name.resize(std::min(name.size(), name.find(':')));
    if (name.empty() || name[0] == '+' || name[0] == '^') return;
    if (std::find(hosts.begin(), hosts.end(), name) == hosts.end()) hosts.push_back(std::move(name));
  };
  auto words = [](const std::string& text, const char* separators) {
    std::vector<std::string> out;
    for (std::size_t at = text.find_first_not_of(separators); at != std::string::npos;
         at = text.find_first_not_of(separators, at)) {
      const std::size_t end = std::min(text.size(), text.find_first_of(separators, at));
      out.push_back(text.substr(at, end - at));
      at = end;
    }
    return out;
  };
  for (const auto& [key, value] : info) {
    if (key == "host" || key == "add-host") {
      for (std::string& name : words(value, ", \t")) add(std::move(name));
    } else if (key == "hostfile" || key == "add-hostfile") {
      std::ifstream file(value);
      for (std::string line; std::getline(file, line);) {
        const std::vector<std::string> line_words = words(line.substr(0, line.find('#')), " \t\r");
        if (!line_words.empty() && line_words[0] != "rank") add(line_words[0]);
      }
    }
  }
  return hosts;
}

/// @throws Error a host of `info` (spawn_hosts) that this machine cannot
/// resolve, or resolve now: Open MPI would wait for ever to start a rank
/// there. This host's own name is not looked up: Open MPI knows it.
inline void check_spawn_hosts(std::size_t ranks, const SpawnInfo& info) {
  const std::string own = mpi_wire::host_name();
  for (const std::string& host : spawn_hosts(info)) {
    if (host == own || host == "localhost") continue;
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    const int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &found);
    if (found != nullptr) ::freeaddrinfo(found);
    // EAI_AGAIN too: ssh, which Open MPI starts its daemon with, could not resolve it either.
    bool unknown = rc == EAI_NONAME || rc == EAI_FAIL || rc == EAI_AGAIN;
#ifdef EAI_NODATA
    unknown = unknown || rc == EAI_NODATA;
#endif
    if (unknown) {
      throw Error("procpool: procpool::mpi::spawn(" + std::to_string(ranks) + "): host \"" + host +
                  "\" in Settings::spawn_info is not a name this machine can resolve (" + ::gai_strerror(rc) +
                  "), and MPI_Comm_spawn would wait for ever to start a rank there. Fix the name, or set "
                  "Settings::resolve_hosts = false if only the launcher knows it (an ssh alias)");
    }
  }
}

/// Ends the program if MPI_Comm_spawn has not returned `timeout` after this
/// was made (0 or less: never): Open MPI 4.1 waits for ever when it cannot
/// start a rank, and only MPI_Abort ends that wait. Made right before the
/// call and destroyed right after it.
class SpawnWatch {
 public:
  SpawnWatch(std::chrono::milliseconds timeout, std::string message) {
    if (timeout <= std::chrono::milliseconds(0)) return;
    // A steady_clock deadline this far out would overflow: 100 years is for ever enough.
    timeout = std::min<std::chrono::milliseconds>(timeout, std::chrono::hours(24 * 365 * 100));
    thread_ = InternalThread("the MPI_Comm_spawn watchdog", [this, timeout, message = std::move(message)] {
      std::unique_lock lock(mutex_);
      if (returned_.wait_for(lock, timeout, [&] { return done_; })) return;
      std::fprintf(stderr, "%s\n", message.c_str());
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 1);
      std::_Exit(1);  // should MPI_Abort return
    });
  }
  SpawnWatch(const SpawnWatch&) = delete;
  SpawnWatch& operator=(const SpawnWatch&) = delete;
  /// MPI_Comm_spawn returned.
  ~SpawnWatch() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    returned_.notify_all();
    thread_.join();
  }

 private:
  std::mutex mutex_;
  std::condition_variable returned_;
  bool done_ = false;
  InternalThread thread_;  // last: the members it uses outlive it
};

}  // namespace procpool::detail

// procpool - what rank 0 and a serving rank say to each other over MPI
// (mpi_hub.hpp is rank 0's side, mpi_serve.hpp a serving rank's), and the
// sends both sides keep in flight. A message's tag says its kind and, for a
// worker's messages, which worker: tag = kind + 16 * worker id. The bytes of
// a worker's frames (protocol.hpp) travel as `data` messages, cut anywhere:
// the two ends see one stream of bytes per worker, as through a pipe.
#pragma once

#define OMPI_SKIP_MPICXX 1   // NOLINT: only the C API
#define MPICH_SKIP_MPICXX 1  // NOLINT
#include <mpi.h>

#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "task_memory.hpp"

namespace procpool::detail::mpi_wire {

enum Kind : int {
  // rank 0 -> serving rank
  open = 1,           // a pool starts: OpenMessage
  start = 2,          // start a worker (tag's id)
  data = 3,           // bytes of a worker's stream (both ways)
  close_sending = 4,  // the worker gets no more messages
  kill = 5,           // a signal for the worker: int32
  close = 6,          // the pool ends: stop every worker, answer `closed`
  finish = 7,         // the program ends: leave MPI and exit
  // serving rank -> rank 0
  hello = 8,          // answers `open`: HelloMessage
  started = 9,        // int32 pid
  start_failed = 10,  // uint8 refused, then the reason
  ended = 11,         // int32 wait status; nothing more comes for the id
  beat = 12,          // still here (every heartbeat interval)
  closed = 13,        // answers `close`: nothing more comes for the pool
  finished = 14,      // answers `finish`: nothing more comes; it leaves MPI
};

inline constexpr int kind_bits = 4;
inline constexpr std::uint32_t version = 2;
/// Bytes of one MPI message at most: MPI counts in int, and a receive this
/// large takes well under a heartbeat period even over 1 Gb/s.
inline constexpr std::size_t max_piece = std::size_t{64} << 20;
/// Messages taken in one go before a side looks at its other work.
inline constexpr std::size_t take_at_most = 256;

inline int tag(Kind kind, std::uint32_t id = 0) { return static_cast<int>(kind) | static_cast<int>(id << kind_bits); }
inline Kind kind_of(int tag) { return static_cast<Kind>(tag & ((1 << kind_bits) - 1)); }
inline std::uint32_t id_of(int tag) { return static_cast<std::uint32_t>(tag) >> kind_bits; }

/// How many worker ids a tag can carry on this MPI (MPI_TAG_UB is at least 32767).
inline std::uint32_t max_ids(MPI_Comm comm) {
  int* ub = nullptr;
  int flag = 0;
  MPI_Comm_get_attr(comm, MPI_TAG_UB, &ub, &flag);
  const long top = flag != 0 && ub != nullptr ? *ub : 32767;
  return static_cast<std::uint32_t>(std::min<long>(top >> kind_bits, 1L << 20));
}

// ---- small messages: fixed-width values and strings --------------------------

class Writer {
 public:
  template <class T>
  Writer& put(T value) {
    const auto* p = reinterpret_cast<const char*>(&value);
    bytes_.insert(bytes_.end(), p, p + sizeof(T));
    return *this;
  }
  Writer& put(const std::string& s) {
    put(static_cast<std::uint32_t>(s.size()));
    bytes_.insert(bytes_.end(), s.begin(), s.end());
    return *this;
  }
  std::vector<char> take() { return std::move(bytes_); }

 private:
  std::vector<char> bytes_;
};

class Reader {
 public:
  explicit Reader(std::span<const char> bytes) : bytes_(bytes) {}
  template <class T>
  T get() {
    T value{};
    need(sizeof(T));
    std::memcpy(&value, bytes_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return value;
  }
  std::string text() {
    const auto n = get<std::uint32_t>();
    need(n);
    std::string s(bytes_.data() + at_, n);
    at_ += n;
    return s;
  }

 private:
  void need(std::size_t n) const {
    if (bytes_.size() - at_ < n) throw std::runtime_error("a message from another rank was cut short");
  }
  std::span<const char> bytes_;
  std::size_t at_ = 0;
};

/// `open`: what a serving rank needs to start its workers.
struct OpenMessage {
  std::uint32_t version = mpi_wire::version;
  std::uint8_t start_method = 0;  // StartMethod
  std::uint8_t error_on_threaded_fork = 0;
  std::uint32_t beat_ms = 500;  // how often to send `beat`

  std::vector<char> encode() const {
    return Writer().put(version).put(start_method).put(error_on_threaded_fork).put(beat_ms).take();
  }
  static OpenMessage decode(std::span<const char> bytes) {
    Reader r(bytes);
    OpenMessage m;
    m.version = r.get<std::uint32_t>();
    m.start_method = r.get<std::uint8_t>();
    m.error_on_threaded_fork = r.get<std::uint8_t>();
    m.beat_ms = r.get<std::uint32_t>();
    return m;
  }
};

/// `hello`: who the serving rank is, and whether it can serve.
struct HelloMessage {
  std::uint32_t version = mpi_wire::version;
  std::uint32_t cpus = 0;
  std::int32_t pid = 0;
  std::string build;  // build_id()
  std::string host;
  std::string error;  // why it cannot serve, or empty

  std::vector<char> encode() const {
    return Writer().put(version).put(cpus).put(pid).put(build).put(host).put(error).take();
  }
  static HelloMessage decode(std::span<const char> bytes) {
    Reader r(bytes);
    HelloMessage m;
    m.version = r.get<std::uint32_t>();
    m.cpus = r.get<std::uint32_t>();
    m.pid = r.get<std::int32_t>();
    m.build = r.text();
    m.host = r.text();
    m.error = r.text();
    return m;
  }
};

// ---- identity of the program -------------------------------------------------

/// The program's GNU build id (the linker's note), in hex; without one, a
/// hash of the executable's bytes. Every rank must run the same build: a
/// task names its function by the program's own registry.
inline std::string build_id() {
  static const std::string id = [] {
    std::string found;
    dl_iterate_phdr(
        [](dl_phdr_info* info, std::size_t, void* out) -> int {
          auto& hex = *static_cast<std::string*>(out);
          for (int i = 0; i < info->dlpi_phnum; ++i) {
            const ElfW(Phdr)& ph = info->dlpi_phdr[i];
            if (ph.p_type != PT_NOTE) continue;
            const char* p = reinterpret_cast<const char*>(info->dlpi_addr + ph.p_vaddr);
            const char* end = p + ph.p_memsz;
            while (p + sizeof(ElfW(Nhdr)) <= end) {
              const auto* note = reinterpret_cast<const ElfW(Nhdr)*>(p);
              const char* name = p + sizeof(ElfW(Nhdr));
              const char* desc = name + ((note->n_namesz + 3) & ~3u);
              if (note->n_type == NT_GNU_BUILD_ID && note->n_namesz == 4 && std::memcmp(name, "GNU", 4) == 0) {
                for (unsigned k = 0; k < note->n_descsz; ++k) {
                  hex += fmt::format("{:02x}", static_cast<unsigned char>(desc[k]));
                }
                return 1;
              }
              p = desc + ((note->n_descsz + 3) & ~3u);
            }
          }
          return 1;  // only the first object: the program itself
        },
        &found);
    if (!found.empty()) return found;
    std::ifstream exe("/proc/self/exe", std::ios::binary);
    std::uint64_t hash = 1469598103934665603ull;  // FNV-1a
    char buf[1 << 16];
    while (exe.read(buf, sizeof(buf)) || exe.gcount() > 0) {
      for (std::streamsize k = 0; k < exe.gcount(); ++k) {
        hash = (hash ^ static_cast<unsigned char>(buf[k])) * 1099511628211ull;
      }
    }
    return fmt::format("fnv-{:016x}", hash);
  }();
  return id;
}

inline std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "unknown host";
  return name;
}

// ---- sends in flight ------------------------------------------------------------

/// Nonblocking sends, each holding its bytes until MPI is done with them:
/// neither side ever blocks in a send while the other does too.
class Sends {
 public:
  Sends() = default;
  Sends(const Sends&) = delete;
  Sends& operator=(const Sends&) = delete;
  ~Sends() { abandon_all(); }

  /// Sends `bytes` (owned until done).
  void send(MPI_Comm comm, int dest, int tag, std::vector<char> bytes) {
    auto held = std::make_shared<std::vector<char>>(std::move(bytes));
    const char* p = held->data();
    const std::size_t n = held->size();
    post(comm, dest, tag, p, n, std::shared_ptr<const void>(held, held.get()));
  }
  /// Sends the first `size` bytes of `bytes` (owned until done).
  void send(MPI_Comm comm, int dest, int tag, std::unique_ptr<char[]> bytes, std::size_t size) {
    std::shared_ptr<char[]> held(std::move(bytes));
    const char* p = held.get();
    post(comm, dest, tag, p, size, std::shared_ptr<const void>(held, p));
  }
  /// Sends `size` bytes at `p`, which `keep` keeps alive; in pieces of at
  /// most max_piece.
  void post(MPI_Comm comm, int dest, int tag, const char* p, std::size_t size, std::shared_ptr<const void> keep) {
    do {
      const std::size_t n = std::min(size, max_piece);
      Pending s{MPI_REQUEST_NULL, dest, keep};
      const int rc = MPI_Isend(p, static_cast<int>(n), MPI_BYTE, dest, tag, comm, &s.request);
      if (rc != MPI_SUCCESS) throw std::runtime_error(fmt::format("MPI_Isend to rank {} failed", dest));
      pending_.push_back(std::move(s));
      p += n;
      size -= n;
    } while (size > 0);
  }
  /// Lets go of the sends MPI has finished with. Returns whether any is left.
  bool progress() {
    for (std::size_t k = 0; k < pending_.size();) {
      int done = 0;
      MPI_Test(&pending_[k].request, &done, MPI_STATUS_IGNORE);
      if (done == 0) {
        ++k;
        continue;
      }
      pending_[k] = std::move(pending_.back());
      pending_.pop_back();
    }
    return !pending_.empty();
  }
  bool empty() const noexcept { return pending_.empty(); }
  /// Gives up the sends to `dest` (a rank that is gone).
  void abandon(int dest) {
    for (std::size_t k = 0; k < pending_.size();) {
      if (pending_[k].dest != dest) {
        ++k;
        continue;
      }
      drop(pending_[k]);
      pending_[k] = std::move(pending_.back());
      pending_.pop_back();
    }
  }
  void abandon_all() {
    for (auto& s : pending_) drop(s);
    pending_.clear();
  }

 private:
  struct Pending {
    MPI_Request request;
    int dest;
    std::shared_ptr<const void> keep;
  };
  static void drop(Pending& s) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized != 0 || s.request == MPI_REQUEST_NULL) return;
    MPI_Cancel(&s.request);
    MPI_Request_free(&s.request);
    // Its bytes are kept: MPI may still read them.
    (void)new std::shared_ptr<const void>(std::move(s.keep));  // NOLINT: leaked on purpose
  }
  std::vector<Pending> pending_;
};

/// How long a side with nothing to do sleeps before it looks for messages
/// again, in µs: an eighth of the time it has been idle, from 5 µs to 4 ms
/// (50 µs while its sends are in flight: MPI moves them only when called).
/// An answer waits at most an eighth longer than it took; an idle rank
/// wakes 250 times a second.
inline long rest_us(std::chrono::steady_clock::duration idle_for, bool sending) {
  const long us = static_cast<long>(std::chrono::duration_cast<std::chrono::microseconds>(idle_for).count() / 8);
  return std::clamp(us, 5L, sending ? 50L : 4000L);
}

/// Hands each message waiting from `source` (MPI_ANY_SOURCE: any), up to
/// take_at_most, to on_message(MPI_Message&, MPI_Status&), which must
/// receive it. Returns how many there were.
template <class OnMessage>
std::size_t take_waiting(MPI_Comm comm, int source, OnMessage&& on_message) {
  std::size_t taken = 0;
  for (; taken < take_at_most; ++taken) {
    int flag = 0;
    MPI_Message msg;
    MPI_Status status;
    MPI_Improbe(source, MPI_ANY_TAG, comm, &flag, &msg, &status);
    if (flag == 0) break;
    on_message(msg, status);
  }
  return taken;
}

/// A message's bytes, received where no zeros were written first.
struct Received {
  std::unique_ptr<char[]> data;
  std::size_t size = 0;
  operator std::span<const char>() const noexcept { return {data.get(), size}; }  // NOLINT: for Reader
};

/// Receives the message `msg` into a new buffer.
inline Received receive(MPI_Message& msg, MPI_Status& status) {
  int count = 0;
  MPI_Get_count(&status, MPI_BYTE, &count);
  Received got{std::make_unique_for_overwrite<char[]>(static_cast<std::size_t>(count)),
               static_cast<std::size_t>(count)};
  MPI_Mrecv(got.data.get(), count, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
  return got;
}

/// How long a serving rank told to finish waits for its sends to be taken
/// before it gives them up and answers `finished` anyway; rank 0 takes in
/// what ranks send for a little longer (finish_wait), so a rank that is
/// slow but alive always answers in time.
inline constexpr std::chrono::seconds give_up_sends{10};
inline constexpr std::chrono::seconds finish_wait{12};

/// Tells `ranks` of `comm` that the program ends (`finish`), and takes in
/// and drops what they still send (so their sends end, and they can leave
/// MPI) until each answers `finished` or `deadline` passes. Returns the
/// ranks that did not answer.
inline std::vector<int> finish_ranks(MPI_Comm comm, const std::vector<int>& ranks,
                                     std::chrono::steady_clock::time_point deadline) {
  Sends sends;
  for (int r : ranks) sends.send(comm, r, tag(finish), {});
  std::vector<int> left = ranks;
  while (!left.empty() && std::chrono::steady_clock::now() < deadline) {
    sends.progress();
    const std::size_t taken = take_waiting(comm, MPI_ANY_SOURCE, [&](MPI_Message& msg, MPI_Status& status) {
      (void)receive(msg, status);
      if (kind_of(status.MPI_TAG) == finished) std::erase(left, status.MPI_SOURCE);
    });
    if (taken == 0) ::usleep(100);
  }
  return left;  // the finish sends not taken are given up with `sends`
}

}  // namespace procpool::detail::mpi_wire

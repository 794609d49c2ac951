// mpi_primes: counts the primes below N with a procpool::Pool whose workers
// run on MPI ranks, possibly on many machines, and checks the count against
// a serial one. Shows the MPI backend: the same Pool code as on one machine.
//
//   mpirun -np 3 ./mpi_primes [N]        rank 0 runs main; ranks 1 and 2 serve
//   ./mpi_primes [N] --spawn R           starts R serving ranks itself
//
// N defaults to 2000000. Each serving rank starts a worker process per CPU.
// Exits 1 if the two counts disagree, 2 on a bad argument.
#include <procpool/mpi.hpp>

#include <fmt/format.h>

#include <unistd.h>
#include <charconv>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace {

using Block = std::pair<std::uint64_t, std::uint64_t>;  // the numbers [first, last)

bool is_prime(std::uint64_t n) {
  if (n < 2) return false;
  if (n % 2 == 0) return n == 2;
  for (std::uint64_t d = 3; d * d <= n; d += 2) {
    if (n % d == 0) return false;
  }
  return true;
}

std::uint64_t count_primes(Block block) {
  std::uint64_t count = 0;
  for (std::uint64_t n = block.first; n < block.second; ++n) count += is_prime(n) ? 1 : 0;
  return count;
}

// Which machine ran a task: the example prints where its work went.
std::string host(int) {
  char name[256] = {};
  ::gethostname(name, sizeof(name) - 1);
  return name;
}

bool parse(std::string_view text, std::uint64_t& out) {
  auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), out);
  return err == std::errc() && end == text.data() + text.size();
}

}  // namespace

int main(int argc, char** argv) {
  procpool::mpi::init(argc, argv);  // ranks other than 0 serve here and never return

  std::uint64_t n = 2'000'000, spawn = 0;
  for (int k = 1; k < argc; ++k) {
    std::string_view arg = argv[k];
    bool ok = arg == "--spawn" ? k + 1 < argc && parse(argv[++k], spawn) : parse(arg, n);
    if (!ok) {
      fmt::print(stderr, "usage: mpirun -np 3 {0} [N]  or  {0} [N] --spawn RANKS\n", argv[0]);
      return 2;
    }
  }

  procpool::Pool pool({.backend = spawn > 0 ? procpool::mpi::spawn(spawn) : procpool::mpi::world()});
  std::vector<Block> blocks;
  for (std::uint64_t first = 0; first < n; first += 20'000) blocks.emplace_back(first, std::min(n, first + 20'000));
  std::uint64_t total = 0;
  for (std::uint64_t c : pool.map<count_primes>(blocks, 1)) total += c;

  auto hosts = pool.map<host>(std::vector<int>(4 * pool.processes()), 1);
  fmt::print("{} worker processes on {}\n", pool.processes(),
             fmt::join(std::set<std::string>(hosts.begin(), hosts.end()), ", "));
  const std::uint64_t serial = count_primes({0, n});
  fmt::print("primes below {}: {} (serial count: {}): {}\n", n, total, serial, total == serial ? "ok" : "WRONG");
  return total == serial ? 0 : 1;
}

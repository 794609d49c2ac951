// The reference for benchmarks/compile_time.sh: the README example's work
// done with cereal, fmt and std::thread directly (each item serialized to a
// thread and its result serialized back), the way procpool uses them.
#include <sstream>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <cereal/archives/binary.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>

long square(long x) { return x * x; }

int main() {
  std::vector<long> xs{1, 2, 3};
  std::vector<std::string> out(xs.size());
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    std::ostringstream task;
    cereal::BinaryOutputArchive save_task(task);
    save_task(xs[i]);
    threads.emplace_back([&out, i, bytes = task.str()] {
      std::istringstream in(bytes);
      long x = 0;
      cereal::BinaryInputArchive load_task(in);
      load_task(x);
      std::ostringstream result;
      cereal::BinaryOutputArchive save_result(result);
      save_result(square(x));
      out[i] = result.str();
    });
  }
  for (auto& t : threads) t.join();
  std::vector<long> squares;
  for (const auto& bytes : out) {
    std::istringstream in(bytes);
    long y = 0;
    cereal::BinaryInputArchive load_result(in);
    load_result(y);
    squares.push_back(y);
  }
  fmt::print("{}\n", fmt::join(squares, ", "));
}

// wordfreq: the 20 most frequent words in the files named on the command
// line. Each file is counted in a worker process, and the parent merges the
// counts as they arrive with pool.imap_unordered. Shows imap_unordered, a
// container as a result, and carrying on past a task that failed.
//
//   ./wordfreq FILE...
//
// Words are runs of letters and digits, lowercased. A file that cannot be
// read is reported and skipped, and the exit status is then 1.
#include <procpool/procpool.hpp>

#include <fmt/core.h>

#include <algorithm>
#include <cctype>
#include <cstddef>
#include <fstream>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

using Counts = std::unordered_map<std::string, std::size_t>;

// Runs in a worker: only the path travels there, only the counts come back.
Counts count_words(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(fmt::format("cannot open {}", path));
  Counts counts;
  std::string word;
  for (char c; in.get(c);) {
    auto byte = static_cast<unsigned char>(c);
    if (std::isalnum(byte)) {
      word += static_cast<char>(std::tolower(byte));
    } else if (!word.empty()) {
      ++counts[word];
      word.clear();
    }
  }
  if (in.bad()) throw std::runtime_error(fmt::format("cannot read {}", path));
  if (!word.empty()) ++counts[word];
  return counts;
}

}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  if (argc < 2) {
    fmt::print(stderr, "usage: {} FILE...\nPrints the 20 most frequent words in the files.\n", argv[0]);
    return 2;
  }
  const std::vector<std::string> paths(argv + 1, argv + argc);

  procpool::Pool pool;
  Counts total;
  std::size_t files_read = 0;
  int status = 0;
  // Results come in the order the files finish, so a big file early in the
  // list does not hold up merging the others.
  auto results = pool.imap_unordered<count_words>(paths);
  while (true) {
    try {
      std::optional<Counts> counts = results.next();
      if (!counts) break;
      for (const auto& [word, count] : *counts) total[word] += count;
      ++files_read;
    } catch (const procpool::RemoteError& e) {
      // The failed file is consumed; next() goes on with the others.
      fmt::print(stderr, "wordfreq: {}\n", e.message());
      status = 1;
    }
  }

  // Most frequent first, ties alphabetically; only the top needs sorting.
  std::vector<std::pair<std::string, std::size_t>> words(total.begin(), total.end());
  const auto top = std::min<std::size_t>(20, words.size());
  std::partial_sort(words.begin(), words.begin() + static_cast<std::ptrdiff_t>(top), words.end(),
                    [](const auto& a, const auto& b) {
                      return a.second != b.second ? a.second > b.second : a.first < b.first;
                    });
  std::size_t word_count = 0;
  for (const auto& entry : words) word_count += entry.second;

  fmt::print("{} words, {} distinct, in {} of {} files\n", word_count, words.size(), files_read, paths.size());
  for (std::size_t i = 0; i < top; ++i) fmt::print("{:>8}  {}\n", words[i].second, words[i].first);
  return status;
}

// procpool - how procpool's processes show in ps and top: a worker as
// "prog: procpool worker 3" (its command line) and "prog:w3" (its name, the
// 15 characters top shows); the fork server as "prog: procpool fork server"
// and "prog:server".
#pragma once

#include <errno.h>
#include <sys/prctl.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <string>
#include <string_view>

namespace procpool::detail {

class ProcessTitle {
 public:
  static ProcessTitle& instance() {
    static ProcessTitle title;
    return title;
  }

  /// The command line's memory, which set() may overwrite: only in a process
  /// procpool re-executed, whose argv is procpool's own (a forked worker's
  /// is the program's, which its code may still read).
  void own_args(int argc, char** argv) {
    if (argc < 1 || argv == nullptr || argv[0] == nullptr) return;
    // The strings lie one after another; take those that do.
    char* end = argv[0] + std::strlen(argv[0]) + 1;
    for (int i = 1; i < argc && argv[i] == end; ++i) end = argv[i] + std::strlen(argv[i]) + 1;
    args_ = argv[0];
    size_ = static_cast<std::size_t>(end - argv[0]);
    program_ = base_name(argv[0]);
    argv0_ = argv[0];
  }

  /// The program's argv[0] as it was: what set() overwrites. A pool made in
  /// this process starts its own processes with it.
  const char* argv0() const noexcept { return argv0_.empty() ? program_invocation_name : argv0_.c_str(); }

  /// Names this process for its role: `role` ("procpool worker 3") on its
  /// command line, where it may be rewritten, and `short_role` ("w3") in
  /// its name.
  void set(std::string_view role, std::string_view short_role) {
    const std::string program = program_.empty() ? base_name(program_invocation_name) : program_;
    std::string comm =
        program.substr(0, std::min(program.size(), 15 - std::min<std::size_t>(15, short_role.size() + 1)));
    comm += ':';
    comm += short_role;
    comm.resize(std::min<std::size_t>(comm.size(), 15));  // the kernel keeps 15 characters
    ::prctl(PR_SET_NAME, comm.c_str(), 0, 0, 0);
    if (args_ == nullptr || size_ < 2) return;
    std::string line = program + ": " + std::string(role);
    const std::size_t n = std::min(line.size(), size_ - 1);
    std::memcpy(args_, line.data(), n);
    std::memset(args_ + n, 0, size_ - n);
  }

 private:
  static std::string base_name(const char* path) {
    std::string_view name(path != nullptr ? path : "");
    if (auto slash = name.rfind('/'); slash != std::string_view::npos) name.remove_prefix(slash + 1);
    return std::string(name);
  }

  char* args_ = nullptr;
  std::size_t size_ = 0;
  std::string program_;
  std::string argv0_;
};

}  // namespace procpool::detail

// A program that forgets procpool::init: under posix_spawn and forkserver its
// workers re-run main(). The test checks that it fails with a message saying
// what to add, promptly, and starts no more than a handful of processes.
//
// usage: forgets_init <posix_spawn|forkserver> <log file>
#include <procpool/procpool.hpp>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

long square(long x) { return x * x; }

int main(int argc, char** argv) {
  // Every run of main() leaves a line, so the test can count them; the
  // re-run copies find the log through the environment they inherit.
  if (argc >= 3 && std::strncmp(argv[1], "--procpool", 10) != 0) ::setenv("FORGETS_INIT_LOG", argv[2], 1);
  if (const char* path = std::getenv("FORGETS_INIT_LOG")) {
    if (FILE* log = std::fopen(path, "a")) {
      std::fprintf(log, "%d\n", static_cast<int>(::getpid()));
      std::fclose(log);
    }
  }
  const bool spawn = argc >= 2 && std::string(argv[1]) == "posix_spawn";
  try {
    procpool::Pool pool(
        {.processes = 2,
         .start_method = spawn ? procpool::StartMethod::posix_spawn : procpool::StartMethod::forkserver});
    auto squares = pool.map<square>(std::vector<long>{1, 2, 3});
    std::printf("unexpected success: %zu results\n", squares.size());
    return 0;
  } catch (const procpool::Error& e) {
    std::printf("%s\n", e.what());
    return 3;
  }
}

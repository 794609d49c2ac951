// The test runner: procpool::init first, as in every program that uses procpool,
// so the exec-based start methods can run this binary as a worker.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <procpool/procpool.hpp>

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  return Catch::Session().run(argc, argv);
}

#!/usr/bin/env bash
# From a fresh checkout to a running example: builds and runs examples/primes,
# which counts primes in parallel and prints its speedup over a serial count.
# Needs only cmake, make, g++, cereal and fmt; installs whichever is missing
# when run as root (apt), and otherwise says what to install. Arguments go to
# the example (e.g. `scripts/quickstart.sh 2000000 --processes 4`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh cmake make g++ libcereal-dev libfmt-dev
# A build tree of its own (PROCPOOL_QUICKSTART_BUILD, default build-quickstart),
# without tests, benchmarks or docs, and so without their dependencies.
build=${PROCPOOL_QUICKSTART_BUILD:-build-quickstart}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DPROCPOOL_BUILD_TESTS=OFF \
  -DPROCPOOL_BUILD_BENCHMARKS=OFF -DPROCPOOL_BUILD_DOCS=OFF >/dev/null
cmake --build "$build" -j"$(nproc)" --target procpool_example_primes
"$build/examples/primes" "$@"

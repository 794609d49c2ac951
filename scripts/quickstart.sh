#!/usr/bin/env bash
# From a fresh checkout to a running example: installs the Debian packages
# procpool needs (when run as root and they are missing), builds, and runs
# examples/primes, which counts primes in parallel and prints its speedup.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j2 --target procpool_example_primes
build/examples/primes "$@"

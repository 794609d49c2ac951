#!/usr/bin/env bash
# Builds procpool and runs every test: the normal build (g++, with the MPI
# tests under mpirun), then the suite again built with clang++ under
# AddressSanitizer + UndefinedBehaviorSanitizer and with g++ under
# ThreadSanitizer without MPI (the asan and tsan presets, without the fork
# start method, and ThreadSanitizer's posix_spawn runs fewer, see below), then
# fuzzes the frame decoder for 30 seconds (scripts/fuzz.sh). This is the
# README's test command and what CI runs.
# PROCPOOL_TEST_SANITIZERS=0 runs the normal build only.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each stage's time, printed as it ends and again at the end.
timings=()
stage() {
  local name=$1 start=$SECONDS
  shift
  echo "=== $name"
  "$@"
  timings+=("$(printf '%5d s  %s' $((SECONDS - start)) "$name")")
  echo "=== $name: $((SECONDS - start)) s"
}
report() {
  echo "=== stage times"
  printf '%s\n' "${timings[@]}"
  echo "=== total: $SECONDS s"
}
trap report EXIT

# Without debug information, which takes a third of the compile time at -O2:
# the sanitizer builds below keep it, for their reports.
stage "build" bash -c 'cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -DNDEBUG" \
  -DPROCPOOL_UNITY_TESTS=ON && cmake --build build -j2'
stage "test" ctest --test-dir build --output-on-failure -j2
# The ThreadSanitizer run: the tests that exclude($1) leaves, but under
# posix_spawn only those tagged [start], [reaping] or [threads]. Both ctest
# runs run whatever the other's outcome.
tsan_tests() {
  local names kept status=0
  # Catch's exit status is the number of tests it lists.
  names=$(build/tsan/tests/procpool_tests --list-test-names-only "[start],[reaping],[threads]" || true)
  kept=$(grep ' - test::PosixSpawn$' <<<"$names" | sed 's/[][\\.*+?()|^$]/\\&/g' | paste -sd'|' || true)
  if [[ -z $kept ]]; then
    echo "test.sh: build/tsan/tests/procpool_tests listed no posix_spawn test tagged [start], [reaping] or [threads]" >&2
    return 1
  fi
  ctest --preset tsan -j2 -E "$1|test::PosixSpawn\$" || status=$?
  ctest --preset tsan -j2 -E "$1" -R "^($kept)\$" || status=$?
  return "$status"
}

if [[ "${PROCPOOL_TEST_SANITIZERS:-1}" != 0 ]]; then
  for preset in asan tsan; do
    # The consumer projects build without sanitizers, and the docs, format and
    # compile-failure checks run no procpool code: the normal run covers them.
    # The asan build is clang's: the suite is built and run with both compilers.
    # The tsan build is also the build without MPI (procpool::mpi, its tests
    # and example left out), which must configure and pass as well.
    compiler=g++ mpi=""
    if [[ $preset == asan ]]; then compiler=clang++; fi
    if [[ $preset == tsan ]]; then mpi="-DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON"; fi
    stage "build $preset ($compiler${mpi:+, no MPI})" bash -c "cmake --preset $preset -DCMAKE_CXX_COMPILER=$compiler \
      -DPROCPOOL_BUILD_BENCHMARKS=OFF -DPROCPOOL_UNITY_TESTS=ON $mpi && cmake --build --preset $preset -j2"
    exclude='^consumer\.|^docs\.|^format\.|^compile_fail\.|^compile\.|^quickstart\.'
    # Neither sanitizer runtime (GCC 12's, clang 14's) is safe to fork() in
    # a threaded program: TSan runs a thread of its own, and ASan's allocator
    # takes a lock that fork() does not hold, so a worker forked while another
    # thread allocates can wait for it for ever (seen: the output relay test,
    # about 1 run in 15 under load). Every pool has an I/O thread, so the fork
    # start method is left to the normal run; the code it shares with the
    # other start methods (the worker loop, the dispatcher) is covered here.
    exclude="$exclude|test::Fork\$|^fork in a"
    if [[ $preset == asan ]]; then
      stage "test $preset" ctest --preset "$preset" -j2 -E "$exclude"
    else
      # ThreadSanitizer runs every test under forkserver, and under
      # posix_spawn those where that start method's own code meets threads
      # (tags [start], [reaping], [threads]): the rest runs the same code
      # under both, and AddressSanitizer runs all of it under both.
      stage "test $preset" tsan_tests "$exclude"
    fi
  done
fi
if [[ "${PROCPOOL_TEST_SANITIZERS:-1}" != 0 ]]; then
  stage "fuzz" scripts/fuzz.sh "${PROCPOOL_FUZZ_SECONDS:-30}"
fi

#!/usr/bin/env bash
# Builds procpool's libFuzzer target for the frame decoder with clang in
# build/fuzz and fuzzes it for a bounded time. Exits non-zero if the fuzzer
# finds a crash, a leak, a timeout or an allocation over its memory limit;
# the input that did it is left in build/fuzz/artifacts/.
#
#   scripts/fuzz.sh            # 60 seconds
#   scripts/fuzz.sh 600        # 10 minutes
#   scripts/fuzz.sh 60 -jobs=2 -workers=2   # anything after the time goes to libFuzzer
#   PROCPOOL_FUZZ_DECODE=0 scripts/fuzz.sh  # the framing only, no cereal decoding
#                                           # (while a decoding finding is open: tests/fuzz/README.md)
#
# Reproduce a finding: build/fuzz/tests/fuzz/procpool_frame_fuzzer <artifact file>
# Needs clang and libFuzzer (Debian 12: apt-get install clang libclang-rt-14-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
  echo "usage: scripts/fuzz.sh [seconds] [libFuzzer flags...]" >&2
  exit 2
fi
CC=${CC:-clang}
CXX=${CXX:-clang++}
if ! command -v "$CXX" >/dev/null; then
  echo "fuzz: $CXX not found; on Debian 12: apt-get install clang libclang-rt-14-dev" >&2
  exit 2
fi

build=build/fuzz
CC=$CC CXX=$CXX cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPROCPOOL_BUILD_FUZZERS=ON \
  -DPROCPOOL_BUILD_EXAMPLES=OFF -DPROCPOOL_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$build" -j2 --target procpool_frame_fuzzer procpool_frame_corpus

fuzzer=$build/tests/fuzz/procpool_frame_fuzzer
# Seeds: the committed corpus, plus a fresh one from the current encoders (so
# a change to the wire format reaches the fuzzer at once). New inputs the
# fuzzer finds go to the first directory, outside the source tree.
mkdir -p "$build/corpus" "$build/seeds" "$build/artifacts"
rm -f "$build"/seeds/*
"$build/tests/fuzz/procpool_frame_corpus" "$build/seeds"

echo "fuzz: running $fuzzer for ${seconds}s"
status=0
"$fuzzer" -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
  -print_final_stats=1 -artifact_prefix="$build/artifacts/" "$@" \
  "$build/corpus" tests/fuzz/corpus "$build/seeds" || status=$?
if ((status != 0)); then
  echo "fuzz: the fuzzer found a problem (exit $status); inputs in $build/artifacts/:" >&2
  ls -1 "$build/artifacts" >&2 || true
  echo "fuzz: reproduce with: $fuzzer <artifact>" >&2
  exit 1
fi
echo "fuzz: no crash, leak or memory blow-up in ${seconds}s"

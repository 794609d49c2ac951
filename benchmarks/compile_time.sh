#!/bin/sh
# Compile time of procpool's README example against a program doing the same
# work with cereal, fmt and std::thread (compile_time/reference.cpp), with the
# library header-only (the default) and with its engine compiled once
# (PROCPOOL_SEPARATE_COMPILATION; the engine's object file is built first and
# linked like libfmt, untimed). Interleaved runs; prints the median of each
# and the ratios.
#
#   benchmarks/compile_time.sh [runs] [compiler]     (defaults: 5, g++)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
runs=${1:-5}
cxx=${2:-g++}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The example exactly as the README shows it.
sed -n '/^```cpp/,/^```/p' "$root/README.md" | sed '1d;$d' | awk 'NR==1,/^}/' > "$tmp/example.cpp"
printf '#include <procpool/procpool.hpp>\nint main() {}\n' > "$tmp/header.cpp"
cp "$here/compile_time/reference.cpp" "$tmp/reference.cpp"
printf '#include <procpool/src.hpp>\n' > "$tmp/engine.cpp"
"$cxx" -std=c++20 -I"$root/include" -O2 -DPROCPOOL_SEPARATE_COMPILATION -c "$tmp/engine.cpp" -o "$tmp/engine.o"
sep="-DPROCPOOL_SEPARATE_COMPILATION"

time_of() {  # seconds for one compile: time_of FILE FLAGS...
  file=$1; shift
  start=$(date +%s.%N)
  "$cxx" -std=c++20 -I"$root/include" "$@" "$tmp/$file" -o "$tmp/out" -lfmt -pthread 2>"$tmp/err" || {
    cat "$tmp/err" >&2; exit 1; }
  end=$(date +%s.%N)
  awk "BEGIN { print $end - $start }"
}
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

: > "$tmp/ex.O2"; : > "$tmp/exsep.O2"; : > "$tmp/ref.O2"
: > "$tmp/hdr.syn"; : > "$tmp/hdrsep.syn"; : > "$tmp/ref.syn"
i=0
while [ "$i" -lt "$runs" ]; do
  time_of example.cpp -O2 >> "$tmp/ex.O2"
  time_of example.cpp -O2 "$sep" "$tmp/engine.o" >> "$tmp/exsep.O2"
  time_of reference.cpp -O2 >> "$tmp/ref.O2"
  time_of header.cpp -fsyntax-only >> "$tmp/hdr.syn"
  time_of header.cpp -fsyntax-only "$sep" >> "$tmp/hdrsep.syn"
  time_of reference.cpp -fsyntax-only >> "$tmp/ref.syn"
  i=$((i + 1))
done
ex=$(median < "$tmp/ex.O2"); exsep=$(median < "$tmp/exsep.O2"); ref=$(median < "$tmp/ref.O2")
hdr=$(median < "$tmp/hdr.syn"); hdrsep=$(median < "$tmp/hdrsep.syn"); refs=$(median < "$tmp/ref.syn")
row() { printf '%-56s %6.2f s  %5.2fx\n' "$1" "$2" "$(awk "BEGIN { print $2 / $3 }")"; }
echo "compiler: $("$cxx" --version | head -n 1); medians of $runs interleaved runs; ratio to the reference"
row "cereal + fmt + std::thread reference, -O2" "$ref" "$ref"
row "README example, -O2, header-only" "$ex" "$ref"
row "README example, -O2, engine compiled once" "$exsep" "$ref"
row "reference, -fsyntax-only" "$refs" "$refs"
row "#include <procpool/procpool.hpp>, header-only" "$hdr" "$refs"
row "#include <procpool/procpool.hpp>, engine compiled once" "$hdrsep" "$refs"

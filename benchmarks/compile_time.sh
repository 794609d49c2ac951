#!/bin/sh
# Compile time of procpool's README example against a program doing the same
# work with cereal, fmt and std::thread (compile_time/reference.cpp).
# Interleaved runs; prints the median of each and their ratio.
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

time_of() {  # seconds for one compile: time_of FILE FLAGS...
  file=$1; shift
  start=$(date +%s.%N)
  "$cxx" -std=c++20 -I"$root/include" "$@" "$tmp/$file" -o "$tmp/out" -lfmt -pthread 2>"$tmp/err" || {
    cat "$tmp/err" >&2; exit 1; }
  end=$(date +%s.%N)
  awk "BEGIN { print $end - $start }"
}
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

: > "$tmp/ex.O2"; : > "$tmp/ref.O2"; : > "$tmp/hdr.syn"; : > "$tmp/ref.syn"
i=0
while [ "$i" -lt "$runs" ]; do
  time_of example.cpp -O2 >> "$tmp/ex.O2"
  time_of reference.cpp -O2 >> "$tmp/ref.O2"
  time_of header.cpp -fsyntax-only >> "$tmp/hdr.syn"
  time_of reference.cpp -fsyntax-only >> "$tmp/ref.syn"
  i=$((i + 1))
done
ex=$(median < "$tmp/ex.O2"); ref=$(median < "$tmp/ref.O2")
hdr=$(median < "$tmp/hdr.syn"); refs=$(median < "$tmp/ref.syn")
echo "compiler: $("$cxx" --version | head -n 1); medians of $runs interleaved runs"
printf '%-42s %6.2f s\n' "README example, -O2" "$ex"
printf '%-42s %6.2f s\n' "cereal + fmt + std::thread reference, -O2" "$ref"
printf '%-42s %6.2fx\n' "ratio" "$(awk "BEGIN { print $ex / $ref }")"
printf '%-42s %6.2f s\n' "#include <procpool/procpool.hpp>, -fsyntax-only" "$hdr"
printf '%-42s %6.2f s\n' "reference, -fsyntax-only" "$refs"
printf '%-42s %6.2fx\n' "ratio" "$(awk "BEGIN { print $hdr / $refs }")"

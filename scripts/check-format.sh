#!/usr/bin/env bash
# Fails (exit 1) if any tracked .hpp/.cpp file is not formatted as
# .clang-format says, printing clang-format's complaint for each line.
# Fix with: git ls-files '*.hpp' '*.cpp' | xargs clang-format -i
# CLANG_FORMAT picks the binary (default: clang-format-14, else clang-format):
# other versions format some constructs differently.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${CLANG_FORMAT:-}" ]]; then
  CLANG_FORMAT=$(command -v clang-format-14 || command -v clang-format || true)
fi
if [[ -z "$CLANG_FORMAT" ]]; then
  echo "check-format: clang-format not found; on Debian 12: apt-get install clang-format" >&2
  exit 2
fi
mapfile -d '' files < <(git ls-files -z -- '*.hpp' '*.cpp')
if ((${#files[@]} == 0)); then
  exit 0
fi
if "$CLANG_FORMAT" --dry-run --Werror "${files[@]}"; then
  echo "check-format: ${#files[@]} files formatted"
else
  echo "check-format: unformatted code (see above); run: git ls-files '*.hpp' '*.cpp' | xargs $CLANG_FORMAT -i" >&2
  exit 1
fi

#!/usr/bin/env bash
# Installs what procpool's build, tests, examples and benchmarks need on
# Debian 12, when run as root and something is missing; or only the packages
# named as arguments. Safe to re-run. As another user: exits 0 if nothing is
# missing, and otherwise names what to install.
set -euo pipefail
packages=(cmake g++ make libcereal-dev libfmt-dev catch2 libbenchmark-dev python3 clang-format-14
  clang libclang-rt-14-dev tmux doxygen openmpi-bin libopenmpi-dev)
if (($# > 0)); then
  packages=("$@")
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "procpool needs these Debian packages: ${missing[*]}" >&2
  echo "run as root: apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"

#!/usr/bin/env bash
# No process of the program (ranks, fork servers, workers) lives on once
# mpirun, or the program that spawned its ranks, has returned. Zombies are
# left out: they are dead, and reaping them is the init process's job.
set -euo pipefail
mpirun=$1 suite=$2
# Ranks show the binary's path; fork servers and workers retitle themselves
# "[name:...]".
pattern="^($suite|\\[$(basename "$suite")[]:])"
alive() {
  local n=0 pid
  for pid in $(pgrep -f -- "$pattern" || true); do
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo Z) == Z ]] || n=$((n + 1))
  done
  echo "$n"
}
check() {
  local what=$1 n
  sleep 0.5
  n=$(alive)
  if ((n != 0)); then
    echo "FAILED: $n processes of $suite left after $what:"
    pgrep -af -- "$pattern" || true
    exit 1
  fi
  echo "ok: nothing left after $what"
}
"$mpirun" -np 3 "$suite" "pools on MPI ranks follow one another,a segfaulting task*"
check "mpirun -np 3"
PROCPOOL_TEST_BACKEND=spawn "$suite" "pools on MPI ranks follow one another,a task over its time limit*"
check "a program that spawned its ranks"
"$mpirun" --enable-recovery -np 3 "$suite" "[.lost]"
check "mpirun --enable-recovery -np 3 with a rank killed"

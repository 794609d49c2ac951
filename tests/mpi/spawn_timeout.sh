#!/usr/bin/env bash
# A spawn MPI cannot complete (its host is handed to ssh unresolved) ends the
# program after Settings::spawn_timeout (3 s here): it says why, exits with
# a failure status, and neither it nor Open MPI's daemon is left running.
set -uo pipefail
suite=$1
# Open MPI's daemons and this suite's processes, zombies left out (they are
# dead; reaping them is the init process's job).
daemons() { ps -eo pid=,stat=,comm= | awk '$2 !~ /^Z/ && $3 == "orted" { print $1 }' | sort; }
suites() { ps -eo pid=,stat=,args= | awk -v s="$suite" '$2 !~ /^Z/ && $3 == s { print $1 }'; }
before=$(daemons)
output=$("$suite" "[.unreachable]" 2>&1)
status=$?
echo "$output"
fail() {
  echo "FAILED: $1"
  exit 1
}
((status != 0)) || fail "the program exited 0"
grep -q "a pool was made" <<<"$output" && fail "the spawn returned"
grep -q "procpool::mpi::spawn(1) has not started its ranks after 3000 ms (spawn_info: host=procpool-no-such-host.invalid)" \
  <<<"$output" || fail "no message from the watchdog"
# MPI_Abort has ended the program; its daemon goes within moments.
for _ in $(seq 100); do
  left=$(comm -13 <(echo "$before") <(daemons); suites)
  [[ -z $left ]] && break
  sleep 0.1
done
[[ -z $left ]] || fail "left running: $left"
echo "ok: ended after spawn_timeout with status $status"

#!/usr/bin/env bash
# Presses Ctrl-C on a program that is busy with a procpool::Pool, in a real
# terminal: a tmux pane, so the terminal itself sends SIGINT to the
# foreground process group, as it does for a user. Passes (exit 0) if the
# program ends within 5 seconds and every process it started (fork server,
# workers) is gone; prints the pane either way.
#
#   scripts/ctrl-c-demo.sh build/examples/montecarlo 2000000000
#
# Needs tmux (Debian: apt-get install tmux).
set -euo pipefail
if (($# == 0)); then
  echo "usage: scripts/ctrl-c-demo.sh PROGRAM [ARGS...]" >&2
  exit 2
fi
command -v tmux >/dev/null || {
  echo "ctrl-c-demo: tmux not found; on Debian 12: apt-get install tmux" >&2
  exit 2
}
socket="procpool-ctrl-c-$$"
cleanup() { tmux -L "$socket" kill-server 2>/dev/null || true; }
trap cleanup EXIT

descendants() {  # every process below $1, depth first
  local child
  for child in $(pgrep -P "$1" || true); do
    echo "$child"
    descendants "$child"
  done
}

# The pane runs a shell that runs the program, then reports how it ended and
# stays open so the pane can be read. The shell traps SIGINT (a handler, which
# exec resets for the program; ignoring it would be inherited) so it does not
# itself end with the program.
printf -v command '%q ' "$@"
tmux -L "$socket" new-session -d -x 160 -y 30 \
  "bash -c 'trap : INT; $command; echo \"[exited with status \$?]\"; sleep 60'"
shell=$(tmux -L "$socket" list-panes -F '#{pane_pid}')

# Wait for the program and its pool: it has started processes of its own.
program="" started=()
for _ in $(seq 100); do
  program=$(pgrep -P "$shell" | head -1 || true)
  if [[ -n $program ]]; then
    mapfile -t started < <(descendants "$program")
    ((${#started[@]} >= 2)) && break
  fi
  sleep 0.1
done
if [[ -z $program || ${#started[@]} -lt 2 ]]; then
  echo "ctrl-c-demo: the program did not start a pool within 10 s" >&2
  tmux -L "$socket" capture-pane -p >&2
  exit 1
fi
sleep 1  # let it get busy
mapfile -t started < <(descendants "$program")
echo "ctrl-c-demo: program pid $program, its processes: ${started[*]}; pressing Ctrl-C"
tmux -L "$socket" send-keys C-c

status=0
for _ in $(seq 50); do
  tmux -L "$socket" capture-pane -p | grep -q '\[exited with status' && break
  sleep 0.1
done
pane=$(tmux -L "$socket" capture-pane -p | sed '/^$/d')
echo "---- the terminal after Ctrl-C ----"
echo "$pane"
echo "-----------------------------------"
if ! grep -q '\[exited with status 130\]' <<<"$pane"; then
  echo "ctrl-c-demo: FAILED: the program did not end by SIGINT within 5 s" >&2
  status=1
fi
# Orphans are reaped by init at once; give them a moment to be gone.
left=()
for _ in $(seq 50); do
  left=()
  for pid in "${started[@]}"; do
    [[ -d /proc/$pid ]] && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] && left+=("$pid")
  done
  ((${#left[@]} == 0)) && break
  sleep 0.1
done
if ((${#left[@]} != 0)); then
  echo "ctrl-c-demo: FAILED: processes left behind: ${left[*]}" >&2
  status=1
else
  echo "ctrl-c-demo: the program ended by SIGINT and none of its ${#started[@]} processes is left"
fi
exit $status

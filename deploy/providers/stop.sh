#!/usr/bin/env bash
# Stops the daemons a provider's setup.sh started for STATE_DIR (their pids are in STATE_DIR/pids), each
# with the processes it forked (every daemon leads its own process group: setsid).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
pids_file=$1/pids
[ -f "$pids_file" ] || exit 0
mapfile -t pids < <(tac "$pids_file")  # newest first: clients before the daemons they use
for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
for _ in $(seq 50); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
  [ $alive -eq 1 ] || break
  sleep 0.1
done
for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
rm -f "$pids_file"

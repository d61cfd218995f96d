#!/usr/bin/env bash
# Job: run a bench/ script with the device environment, its output also written to $OUT/NAME.log
# (NAME.2.log, ... when jobs side by side run the same script). The log is written as it comes, so
# it comes back even when the command is killed at its time limit. Exits with the script's status.
set -euo pipefail
usage() {
  [ $# -eq 0 ] || echo "bench.sh: $*" >&2
  echo "usage: scripts/device/jobs/bench.sh SCRIPT [ARGS...]   (SCRIPT: bench/NAME.py, NAME.py or NAME)" >&2
  exit 2
}
root=$(cd "$(dirname "$0")/../../.." && pwd)
[ $# -ge 1 ] || usage "SCRIPT is missing"
name=$(basename "${1%.py}")
script=bench/$name.py
shift
[ -f "$root/$script" ] || usage "no such script: $script"

# shellcheck source=SCRIPTDIR/../lib.sh
. "$root/scripts/device/lib.sh" || exit 1
cd "$PD_ROOT"
log=$(pd_out_new "$name.log")
echo "[$name] python3 $script $* (log $log)"
python3 "$script" "$@" 2>&1 | tee "$log"

#!/usr/bin/env bash
# Job: wait up to SECONDS for the detached jobs (scripts/device/jobs/detach.sh), printing each one's
# latest log line every INTERVAL seconds (default 60). Exits 0 when all have ended (each one's exit
# status printed), 75 when some still run at the limit: call again on the warm machine to go on.
set -euo pipefail
usage() {
  [ $# -eq 0 ] || echo "wait.sh: $*" >&2
  echo "usage: scripts/device/jobs/wait.sh SECONDS [INTERVAL]" >&2
  exit 2
}
root=$(cd "$(dirname "$0")/../../.." && pwd)
[[ $# -ge 1 && $# -le 2 ]] || usage
limit=$1 every=${2:-60}
[[ $limit =~ ^[0-9]+$ && $every =~ ^[1-9][0-9]*$ ]] || usage "SECONDS and INTERVAL are whole numbers"
# shellcheck source=SCRIPTDIR/../lib.sh
. "$root/scripts/device/lib.sh" || exit 1
dir=$PD_HOME/detached
shopt -s nullglob
end=$((SECONDS + limit))
while :; do
  running=0
  for pid in "$dir"/*.pid; do
    name=$(basename "$pid" .pid)
    if [ -f "$dir/$name.rc" ]; then
      state="ended, exit $(cat "$dir/$name.rc")"
    else
      running=$((running + 1)) state=running
    fi
    echo "[$name] $state | $(tail -c 2000 "$dir/$name.log" 2>/dev/null | tr '\r' '\n' | grep -v '^\s*$' | tail -n 1 | cut -c1-200)"
  done
  [ "$running" -gt 0 ] || { echo "wait: every detached job has ended"; exit 0; }
  [ "$SECONDS" -lt "$end" ] || { echo "wait: $running still running at the $limit s limit"; exit 75; }
  sleep "$(( every < end - SECONDS ? every : end - SECONDS ))"
done

#!/usr/bin/env bash
# Job: start another job in its own process session, so it runs on after this call returns and
# through the next calls made back to back while the machine stays warm (the device tool ends a
# call's processes when it returns, except those in a new session). A detached job has no $OUT of
# its own: recipe.sh then leaves packing to the call that collects it (scripts/device/jobs/wait.sh
# waits; pd_pack packs). Its log and exit status: /tmp/pd/detached/NAME.log and NAME.rc.
set -euo pipefail
usage() {
  [ $# -eq 0 ] || echo "detach.sh: $*" >&2
  echo "usage: scripts/device/jobs/detach.sh NAME JOB [ARGS...]   (JOB: a script under scripts/device/jobs/)" >&2
  exit 2
}
root=$(cd "$(dirname "$0")/../../.." && pwd)
[ $# -ge 2 ] || usage "takes a NAME and a JOB"
name=$1 job=$2
shift 2
[[ $name =~ ^[A-Za-z0-9._-]+$ && $name != . && $name != .. ]] || usage "NAME '$name' is not a plain name"
[ -f "$root/scripts/device/jobs/$(basename "$job")" ] || usage "no job '$job' under scripts/device/jobs/"

# shellcheck source=SCRIPTDIR/../lib.sh
. "$root/scripts/device/lib.sh" || exit 1
dir=$PD_HOME/detached
mkdir -p "$dir"
if [ -e "$dir/$name.pid" ] && [ ! -e "$dir/$name.rc" ]; then usage "a detached job '$name' is still running"; fi
rm -f "$dir/$name.rc" "$dir/$name.pid"
# shellcheck disable=SC2016  # the inner script's $$, $0, $1 and $@ are its own
PD_PACK=0 OUT='' setsid bash -c 'echo $$ >"$1.pid"; shift; "$@"; echo $? >"$0.rc"' \
  "$dir/$name" "$dir/$name" "$root/scripts/device/jobs/$(basename "$job")" "$@" >>"$dir/$name.log" 2>&1 </dev/null &
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -s "$dir/$name.pid" ] && break; sleep 0.2; done
echo "[$name] detached: $job $* (pid $(cat "$dir/$name.pid" 2>/dev/null || echo '?'), log $dir/$name.log)"

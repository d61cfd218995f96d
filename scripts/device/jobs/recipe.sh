#!/usr/bin/env bash
# Job: run a recipe on the GPU for at most LIMIT seconds, resumably; when it has finished, pack its
# final stage (U-Net weights, configs, pocketdiff.json, stage.json, training logs), run.json and the
# job's log into $OUT as RUN.tar (RUN.tar.0, .1, ... when over 16 MiB; here: cat RUN.tar* | tar x).
# The run folder and the log live in /tmp/pd/runs/, so the next call on the warm machine resumes.
# Jobs side by side each take their own RUN name: own run folder, log, lock and tarball. Detached
# (scripts/device/jobs/detach.sh sets PD_PACK=0) it packs nothing: the collecting call does.
set -euo pipefail
usage() {
  [ $# -eq 0 ] || echo "recipe.sh: $*" >&2
  echo "usage: scripts/device/jobs/recipe.sh RECIPE RUN_DIR SECONDS [--set PASS.KEY=VALUE]..." >&2
  echo "  RECIPE   a built-in recipe name (pocketdiff/recipes/NAME.toml) or a recipe file" >&2
  echo "  RUN_DIR  a name (letters, digits, . _ -): the run folder is /tmp/pd/runs/RUN_DIR" >&2
  echo "  SECONDS  time limit of this call's share; exit 75 means unfinished: call again to resume" >&2
  echo "  --set    pocketdiff run's setting overrides (an ablation, a resized run), passed on as given" >&2
  echo "  PD_LAUNCH=accelerate runs it through 'accelerate launch --num_processes \$PD_PROCS'" >&2
  echo "  (default 1): the multi-GPU command line, on however many GPUs the machine has" >&2
  exit 2
}
root=$(cd "$(dirname "$0")/../../.." && pwd)
[ $# -ge 3 ] || usage "takes at least 3 arguments, got $#"
recipe=$1 name=$2 limit=$3
shift 3
overrides=()
while [ $# -gt 0 ]; do
  [ "$1" = --set ] && [ $# -ge 2 ] || usage "after SECONDS only '--set PASS.KEY=VALUE' pairs, got '$1'"
  overrides+=(--set "$2")
  shift 2
done
case ${PD_LAUNCH:-python} in
  python) launch=(python3 -m pocketdiff) ;;
  accelerate)
    [[ ${PD_PROCS:-1} =~ ^[1-9][0-9]*$ ]] || usage "PD_PROCS '${PD_PROCS}' is not a positive whole number"
    launch=(python3 -m accelerate.commands.launch --num_processes "${PD_PROCS:-1}" --num_machines 1
      --mixed_precision no --dynamo_backend no -m pocketdiff) ;;
  *) usage "PD_LAUNCH '$PD_LAUNCH' is neither python nor accelerate" ;;
esac
[ -f "$root/pocketdiff/recipes/$recipe.toml" ] || [ -f "$recipe" ] || usage "no built-in recipe or file '$recipe'"
[[ $name =~ ^[A-Za-z0-9._-]+$ && $name != . && $name != .. ]] || usage "RUN_DIR '$name' is not a plain name"
[[ $limit =~ ^[1-9][0-9]*$ ]] || usage "SECONDS '$limit' is not a positive whole number"

# shellcheck source=SCRIPTDIR/../lib.sh
. "$root/scripts/device/lib.sh" || exit 1
cd "$PD_ROOT"
pd_need "$POCKETDIFF_DATA/train-images-idx3-ubyte" "$POCKETDIFF_DATA/train-labels-idx1-ubyte.gz" \
  "$POCKETDIFF_TEXT_STATES" || exit 3
runs=$PD_HOME/runs run_dir=$PD_HOME/runs/$name log=$PD_HOME/runs/$name.log
mkdir -p "$runs"
exec 7>"$runs/$name.lock"
flock -n 7 || usage "another job of this call is using RUN_DIR '$name'"

say() { sed "s/^/[$name] /"; }
echo "== $(date -u +%FT%TZ) $recipe ${overrides[*]}, at most $limit s: ${launch[*]}" >>"$log"
echo "$recipe ${overrides[*]} -> $run_dir, at most $limit s (log $log)" | say
status=0
"${launch[@]}" run "$recipe" "${overrides[@]}" --out "$run_dir" --device cuda --time-limit "$limit" >>"$log" 2>&1 ||
  status=$?
case $status in
  0)
    if [ "${PD_PACK:-1}" = 0 ]; then
      echo "FINISHED: $run_dir (not packed: detached)" | say
      exit 0
    fi
    final=$(python3 -c 'import json, sys; s = json.load(open(sys.argv[1]))["stages"]; print(s[-1]["folder"] if s else "")' \
      "$run_dir/run.json")
    mapfile -t files < <(cd "$runs" && { [ -z "$final" ] || find "$name/$final" -type f \
      \( -path "$name/$final/unet/*" -o -name '*.json' -o -name '*.jsonl' \); echo "$name/run.json"; echo "$name.log"; })
    pd_pack "$name" "$runs" "${files[@]}"
    echo "FINISHED: packed ${#files[@]} files of ${final:-the run} into \$OUT/$name.tar*" | say ;;
  75)
    tail -n 3 "$log" | say
    echo "UNFINISHED: stopped at the $limit s limit; make the same call again (machine warm) to resume" | say ;;
  *)
    tail -n 20 "$log" | say
    echo "FAILED: exit $status (log above)" | say ;;
esac
exit "$status"

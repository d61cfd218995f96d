#!/usr/bin/env bash
# Job: run several recipes side by side, each sized to the time the session has. First every job
# runs a short probe beside the others (scripts/device/jobs/recipe.sh, PROBE seconds, logging every
# few steps); scripts/device/plan_recipes.py turns each probe's seconds per step into
# `--set PASS.iterations=N` for TRAIN seconds; then each real run starts detached
# (scripts/device/jobs/detach.sh, collected by wait.sh), at most LIMIT seconds. Every command it runs
# is printed, so the record of a shipped model is the job file plus this log.
# JOBFILE: a line per job, `NAME RECIPE SIZE [ARG...]`: SIZE is `PASS[:SHARE],...` (the passes to
# size and their shares of TRAIN, as plan_recipes.py takes them) or `=NAME` (the iterations planned
# for an earlier job: an ablation at the same step count); ARGs are recipe.sh's `--set PASS.KEY=VALUE`
# pairs, `--probe-set PASS.KEY=VALUE` for the probe only (e.g. few steps of an early pass, so the
# probe reaches the next), and `PD_LAUNCH=accelerate` (PD_PROCS=N) to launch through accelerate.
# `#` starts a comment.
set -euo pipefail
usage() {
  [ $# -eq 0 ] || echo "sized.sh: $*" >&2
  echo "usage: scripts/device/jobs/sized.sh PROBE_SECONDS TRAIN_SECONDS LIMIT_SECONDS JOBFILE" >&2
  exit 2
}
root=$(cd "$(dirname "$0")/../../.." && pwd)
[ $# -eq 4 ] || usage "takes 4 arguments, got $#"
probe=$1 train=$2 limit=$3 jobs=$4
for n in "$probe" "$train" "$limit"; do [[ $n =~ ^[1-9][0-9]*$ ]] || usage "'$n' is not a positive whole number"; done
[ -f "$jobs" ] || usage "no job file '$jobs'"
# shellcheck source=SCRIPTDIR/../lib.sh
. "$root/scripts/device/lib.sh" || exit 1
J=$root/scripts/device/jobs runs=$PD_HOME/runs
mapfile -t lines < <(sed 's/#.*//' "$jobs" | awk 'NF')
[ ${#lines[@]} -gt 0 ] || usage "'$jobs' lists no job"

# split NAME RECIPE SIZE ARG... into the globals name recipe size envs[] sets[] probe_sets[]
parse() {
  local -a words
  read -r -a words <<<"$1"
  [ ${#words[@]} -ge 3 ] || usage "job line '$1' needs NAME RECIPE SIZE"
  name=${words[0]} recipe=${words[1]} size=${words[2]} envs=() sets=() probe_sets=()
  local i=3
  while [ $i -lt ${#words[@]} ]; do
    case ${words[$i]} in
      PD_LAUNCH=*|PD_PROCS=*) envs+=("${words[$i]}") ;;
      --set) i=$((i + 1)); sets+=(--set "${words[$i]:?sized.sh: --set without a value in '$1'}") ;;
      --probe-set) i=$((i + 1)); probe_sets+=(--set "${words[$i]:?sized.sh: --probe-set without a value in '$1'}") ;;
      *) usage "job line '$1': '${words[$i]}' is none of --set/--probe-set PASS.KEY=VALUE, PD_LAUNCH=, PD_PROCS=" ;;
    esac
    i=$((i + 1))
  done
}

for line in "${lines[@]}"; do parse "$line"; done  # every line checked before any GPU work
declare -A plan
for line in "${lines[@]}"; do  # the probes, side by side
  parse "$line"
  logs=()
  [[ $size == =* ]] || for p in ${size//,/ }; do logs+=(--set "${p%%:*}.log_every=5"); done
  env "${envs[@]}" "$J/recipe.sh" "$recipe" "probe-$name" "$probe" "${sets[@]}" "${probe_sets[@]}" "${logs[@]}" \
    >/dev/null 2>&1 &
done
wait || true
for line in "${lines[@]}"; do  # plan, then start each real run
  parse "$line"
  if [[ $size == =* ]]; then
    flags=${plan[${size#=}]:-}
    [ -n "$flags" ] || { echo "[$name] NOT STARTED: it takes the plan of ${size#=}, which comes later or failed"; continue; }
  else
    # shellcheck disable=SC2086  # the size specs are words
    flags=$(python3 "$root/scripts/device/plan_recipes.py" "$train" "$runs/probe-$name" ${size//,/ }) || {
      echo "[$name] NOT STARTED: its probe gave no rate; the probe's log ($runs/probe-$name.log) ends:"
      tail -n 5 "$runs/probe-$name.log"
      continue
    }
  fi
  plan[$name]=$flags
  read -r -a planned <<<"$flags"
  echo "[$name] ${envs[*]:+${envs[*]} }recipe.sh $recipe $name $limit ${sets[*]:+${sets[*]} }$flags"
  env "${envs[@]}" "$J/detach.sh" "$name" recipe.sh "$recipe" "$name" "$limit" "${sets[@]}" "${planned[@]}"
done

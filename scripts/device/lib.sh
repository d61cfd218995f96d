# shellcheck shell=bash
# Sourced at the start of every command on the lent GPU host, from the repository root:
#     . scripts/device/lib.sh || exit
# The host has no network: what it lacks travels in the carry sets scripts/device/stage.sh builds
# (.whl, .dev/call1, .dev/call2, .dev/call3), and what this file unpacks lives in /tmp, which the
# machine keeps only while calls follow each other back to back. Sourcing it:
#   - installs the carried wheels (.whl/) into /tmp/site, once per set of wheels;
#   - lays out the pocketdiff namespace in this throw-away copy of the tree as an install would
#     (compress/, export/, runtimes/ linked inside pocketdiff/; `python -m` puts the current folder
#     first on sys.path, so the layout must be right here, not only in an installed copy);
#   - unpacks the staged parts this call carried into /tmp/pd: data/* (*.xz decompressed) into
#     /tmp/pd/data, Inception halves into /tmp/pd/inception/, reassembled into
#     /tmp/pd/inception_fp16.pt once both have arrived and their sha256 (recorded at staging) checks;
#   - exports PYTHONPATH, PYTHONUNBUFFERED, HF_HUB_OFFLINE, POCKETDIFF_DATA, POCKETDIFF_CACHE,
#     POCKETDIFF_TEXT_STATES and, once assembled, POCKETDIFF_INCEPTION;
#   - prints the GPU and the library versions;
#   - defines pd_need, pd_out, pd_out_new and pd_pack for the jobs (scripts/device/jobs/).
# Jobs source it too: the setup runs once per command (PD_READY), under a lock, so jobs started side
# by side never unpack over each other; in a job only the functions are (re)defined.
# PD_TMP (default /tmp) moves all of the machine's state; tests/test_device_scripts.py uses it.

(return 0 2>/dev/null) || { echo "lib.sh is sourced: . scripts/device/lib.sh || exit" >&2; exit 2; }

PD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PD_TMP=${PD_TMP:-/tmp}
PD_HOME=$PD_TMP/pd                  # data/, cache/, inception/, runs/ of the recipe jobs, locks
PD_SITE=$PD_TMP/site                # the carried wheels, installed
PD_OUT_FILES=8                      # what the tool brings back from $OUT: files in all,
PD_OUT_FILE_BYTES=$((16 << 20))     # bytes a file,
PD_OUT_BYTES=$((64 << 20))          # bytes in all (and folders at most 2 deep, names [A-Za-z0-9._-])
export PD_ROOT PD_TMP PD_HOME PD_SITE
export POCKETDIFF_DATA=$PD_HOME/data POCKETDIFF_CACHE=$PD_HOME/cache
export POCKETDIFF_TEXT_STATES=$POCKETDIFF_DATA/captions.safetensors
export PYTHONPATH=$PD_SITE:$PD_ROOT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TQDM_MININTERVAL=10          # progress bars in job logs: a line every 10 s, not every step

# pd_need FILE...: fail (status 3) unless every FILE exists, saying which carry set brings it back.
pd_need() {
  local f status=0
  for f in "$@"; do
    [ -e "$f" ] && continue
    status=3
    case $f in
      "$POCKETDIFF_DATA"/train-*|"$POCKETDIFF_TEXT_STATES") echo "COLD MACHINE: carry .whl .dev/call1 ($f is missing)" ;;
      "$POCKETDIFF_DATA"/t10k-*) echo "COLD MACHINE: carry .dev/call2 ($f is missing)" ;;
      "$PD_HOME"/inception_fp16.pt)
        if [ -f "$PD_HOME/inception/part1" ]; then echo "COLD MACHINE: carry .dev/call3 ($f waits for its second half)"
        elif [ -f "$PD_HOME/inception/part2" ]; then echo "COLD MACHINE: carry .dev/call2 ($f waits for its first half)"
        else echo "COLD MACHINE: carry .dev/call2, then .dev/call3 in the next call ($f is missing)"; fi ;;
      *) echo "COLD MACHINE: $f is missing (an earlier call made it on a machine since given back: rerun that call)" ;;
    esac >&2
  done
  return "$status"
}

# _pd_name_ok NAME: a name the tool brings back (letters, digits, '.', '_', '-'; not . or ..).
_pd_name_ok() { [[ $1 =~ ^[A-Za-z0-9._-]+$ && $1 != . && $1 != .. ]]; }

# _pd_out_check DIR NEW_FILES NEW_BYTES: can DIR (relative to $OUT, '.' for $OUT) take that much more?
_pd_out_check() {
  local part depth=0 have have_bytes
  local -a parts
  if [ -z "${OUT:-}" ] || [ ! -d "$OUT" ]; then echo "pd_out: \$OUT is not a folder" >&2; return 1; fi
  if [ "$1" != . ]; then
    IFS=/ read -r -a parts <<<"$1"
    for part in "${parts[@]}"; do
      _pd_name_ok "$part" || { echo "pd_out: refused folder '$1': names are letters, digits, . _ - only" >&2; return 1; }
      depth=$((depth + 1))
    done
    [ "$depth" -le 2 ] || { echo "pd_out: refused folder '$1': at most 2 folders below \$OUT come back" >&2; return 1; }
  fi
  have=$(find "$OUT" -type f | wc -l)
  have_bytes=$(find "$OUT" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
  [ $((have + $2)) -le "$PD_OUT_FILES" ] ||
    { echo "pd_out: refused: \$OUT would hold $((have + $2)) files, at most $PD_OUT_FILES come back" >&2; return 1; }
  [ $((have_bytes + $3)) -le "$PD_OUT_BYTES" ] ||
    { echo "pd_out: refused: \$OUT would hold $((have_bytes + $3)) bytes, at most $PD_OUT_BYTES come back" >&2; return 1; }
}

# pd_out DIR FILE...: copy FILEs into $OUT/DIR ('.' for $OUT itself) if all of them come back:
# checks every limit first and copies nothing when one fails (status 1); never overwrites.
pd_out() {
  [ $# -ge 2 ] || { echo "usage: pd_out DIR FILE... (DIR relative to \$OUT, '.' for \$OUT)" >&2; return 2; }
  local dir=$1 f size bytes=0
  shift
  for f in "$@"; do
    [ -f "$f" ] || { echo "pd_out: refused $f: not a file" >&2; return 1; }
    _pd_name_ok "$(basename "$f")" || { echo "pd_out: refused $f: names are letters, digits, . _ - only" >&2; return 1; }
    size=$(stat -c %s "$f")
    [ "$size" -le "$PD_OUT_FILE_BYTES" ] ||
      { echo "pd_out: refused $f: $size bytes, at most $PD_OUT_FILE_BYTES a file (pd_pack splits)" >&2; return 1; }
    bytes=$((bytes + size))
  done
  mkdir -p "$PD_HOME"
  (  # one job at a time counts and copies, so jobs side by side cannot overrun the limits together
    flock 8
    _pd_out_check "$dir" "$#" "$bytes" || exit 1
    for f in "$@"; do
      [ ! -e "$OUT/$dir/$(basename "$f")" ] || { echo "pd_out: refused $f: \$OUT/$dir already holds that name" >&2; exit 1; }
    done
    mkdir -p "$OUT/$dir" && cp -- "$@" "$OUT/$dir/"
  ) 8>"$PD_HOME/.out.lock"
}

# pd_out_new NAME: reserve a fresh file $OUT/NAME for output written as it comes (a log that must
# come back even if the command is killed at its time limit); prints its path. A taken name gets
# a number: NAME.log -> NAME.2.log. Counted against the file limit; its size is the writer's care.
pd_out_new() {
  local name=$1 base ext path n=2
  _pd_name_ok "$name" || { echo "pd_out_new: refused '$name': names are letters, digits, . _ - only" >&2; return 1; }
  base=${name%.*} ext=${name##*.}
  [ "$base" != "$name" ] || ext=
  mkdir -p "$PD_HOME"
  (
    flock 8
    _pd_out_check . 1 0 || exit 1
    path=$OUT/$name
    while [ -e "$path" ]; do path=$OUT/$base.$n${ext:+.$ext}; n=$((n + 1)); done
    : >"$path" && echo "$path"
  ) 8>"$PD_HOME/.out.lock"
}

# pd_pack NAME DIR PATH...: tar PATHs (relative to DIR) into $OUT as NAME.tar, or as NAME.tar.0,
# NAME.tar.1, ... of 15 MiB when it is bigger than a file may be. Here: cat NAME.tar* | tar x
pd_pack() {
  local name=$1 dir=$2 tarball
  shift 2
  _pd_name_ok "$name" || { echo "pd_pack: refused '$name': names are letters, digits, . _ - only" >&2; return 1; }
  mkdir -p "$PD_HOME/pack"
  tarball=$PD_HOME/pack/$name.tar
  rm -f "$tarball" "$tarball".*
  tar -C "$dir" -cf "$tarball" -- "$@" || return 1
  if [ "$(stat -c %s "$tarball")" -le "$PD_OUT_FILE_BYTES" ]; then
    pd_out . "$tarball"
  else
    split -b 15M -d -a 1 "$tarball" "$tarball." && rm "$tarball" && pd_out . "$tarball".*
  fi
}

# _pd_install SRC DEST: copy SRC (decompressing a .xz) to DEST atomically, unless the same SRC
# (by checksum) was installed there before: calls that carry a set again cost nothing.
_pd_install() {
  local stamp record
  stamp="$(cksum <"$1") $(basename "$1")"
  record=$PD_HOME/.staged/$(basename "$2")
  [ -f "$2" ] && [ "$(cat "$record" 2>/dev/null)" = "$stamp" ] && return 0
  case $1 in
    *.xz) xz -dc "$1" >"$2.part" ;;
    *) cp "$1" "$2.part" ;;
  esac
  mkdir -p "$PD_HOME/.staged"
  mv "$2.part" "$2" && echo "$stamp" >"$record" && echo "pd: staged $2"
}

# _pd_setup: wheels, namespace, staged parts (in a subshell: set -eu there, not in the caller's shell).
_pd_setup() (
  set -eu
  shopt -s nullglob
  local d f n fname part other sha stamp inc
  local -a wheels
  mkdir -p "$POCKETDIFF_DATA" "$POCKETDIFF_CACHE" "$PD_HOME/inception"
  exec 9>"$PD_HOME/.setup.lock"
  flock 9

  wheels=("$PD_ROOT"/.whl/*.whl)
  if [ ${#wheels[@]} -gt 0 ]; then
    stamp=$(cksum "${wheels[@]}" | awk '{ print $1, $2 }')
    if [ "$stamp" != "$(cat "$PD_SITE/.pd-wheels" 2>/dev/null)" ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PD_SITE" "${wheels[@]}"
      echo "$stamp" >"$PD_SITE/.pd-wheels"
      rm -f "$PD_HOME/.versions"  # new libraries: check the imports again
      echo "pd: installed ${#wheels[@]} wheels into $PD_SITE"
    fi
  fi

  for d in compress export runtimes; do ln -sfn "$PD_ROOT/$d" "$PD_ROOT/pocketdiff/$d"; done

  for f in "$PD_ROOT"/.dev/call*/data/*; do
    fname=$(basename "$f")
    _pd_install "$f" "$POCKETDIFF_DATA/${fname%.xz}"
  done

  # Inception halves: each arrives with the sha256 of the whole file. A half of another staging
  # than the one just carried is dropped (the one just carried is the newer), so it must come again.
  inc=$PD_HOME/inception
  for n in 1 2; do
    for part in "$PD_ROOT"/.dev/call*/inception/"part$n"; do
      sha=$(cat "$(dirname "$part")/sha256")
      [ "$sha" = "$(cat "$PD_HOME/inception_fp16.pt.sha256" 2>/dev/null)" ] && continue  # assembled already
      cp "$part" "$inc/part$n.tmp" && mv "$inc/part$n.tmp" "$inc/part$n" && echo "$sha" >"$inc/part$n.sha256"
      other=$((3 - n))
      if [ -f "$inc/part$other" ] && [ "$(cat "$inc/part$other.sha256")" != "$sha" ]; then
        rm -f "$inc/part$other" "$inc/part$other.sha256"
        echo "pd: WARNING: Inception part$other came from another staging; dropped: carry .dev/call$((other + 1)) again" >&2
      fi
    done
  done
  if [ -f "$inc/part1" ] && [ -f "$inc/part2" ]; then
    sha=$(cat "$inc/part1.sha256")
    cat "$inc/part1" "$inc/part2" >"$inc/whole.tmp"
    if [ "$(sha256sum <"$inc/whole.tmp" | cut -d' ' -f1)" = "$sha" ]; then
      mv "$inc/whole.tmp" "$PD_HOME/inception_fp16.pt" && echo "$sha" >"$PD_HOME/inception_fp16.pt.sha256"
      echo "pd: assembled $PD_HOME/inception_fp16.pt (sha256 checks)"
    else
      echo "pd: WARNING: the two Inception halves do not give the sha256 recorded at staging (a broken copy):" \
        "carry .dev/call2 and .dev/call3 again" >&2
    fi
    rm -f "$inc"/part* "$inc/whole.tmp"
  fi
)

if [ "${PD_READY:-}" != "$PD_ROOT" ]; then
  _pd_setup || { echo "lib.sh: setup failed (above)" >&2; return 1; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "gpu: none found (nvidia-smi missing or failing)"
  # The imports are checked once per machine and set of wheels (seconds of device time each call);
  # the line they print is kept and shown on every call.
  if [ ! -s "$PD_HOME/.versions" ]; then
    python3 - >"$PD_HOME/.versions.tmp" <<'PY' || { echo "lib.sh: python imports failed (above)" >&2; return 1; }
import sys

try:
    import diffusers
except ImportError:
    sys.exit("COLD MACHINE: carry .whl (diffusers is not installed here; scripts/device/stage.sh downloads it)")
import torch
import transformers

import pocketdiff.export  # noqa: F401  (fails when the namespace layout is wrong)

print(f"python {sys.version.split()[0]} torch {torch.__version__} (cuda {torch.version.cuda}, "
      f"available: {torch.cuda.is_available()}) diffusers {diffusers.__version__} transformers {transformers.__version__}")
PY
    mv "$PD_HOME/.versions.tmp" "$PD_HOME/.versions"
  fi
  cat "$PD_HOME/.versions"
  export PD_READY=$PD_ROOT
fi
if [ -f "$PD_HOME/inception_fp16.pt" ]; then export POCKETDIFF_INCEPTION=$PD_HOME/inception_fp16.pt; fi

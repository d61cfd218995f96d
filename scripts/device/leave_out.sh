#!/usr/bin/env bash
# Run HERE, before device calls: keep tracked PATHs (built-in students a GPU job does not read) out of
# what the device tool carries, so the data carry sets fit beside the tree (64 MiB a call in all).
# The files stay on disk; each PATH leaves git's index and is ignored through .git/info/exclude, so
# neither the tool nor `git commit -- OTHER_PATHS` sees it. Undo with --restore after the calls
# (it puts every left-out path back in the index, unchanged). `git status` meanwhile shows them as
# deleted: commit only named paths until restored.
#   scripts/device/leave_out.sh PATH...     leave out
#   scripts/device/leave_out.sh --restore   put them all back
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude=$(git rev-parse --git-path info/exclude)
record=$(git rev-parse --git-path pocketdiff-leave-out)  # the paths left out, one a line
usage() { echo "usage: scripts/device/leave_out.sh PATH... | --restore" >&2; exit 2; }
[ $# -ge 1 ] || usage
if [ "$1" = --restore ]; then
  [ $# -eq 1 ] || usage
  mapfile -t paths < <(cat "$record" 2>/dev/null)
  [ ${#paths[@]} -gt 0 ] || { echo "leave_out: nothing is left out"; exit 0; }
  grep -vxF -f <(sed 's|.*|/&/|' "$record") "$exclude" >"$exclude.tmp" || true
  mv "$exclude.tmp" "$exclude"
  git add -- "${paths[@]}"
  rm -f "$record"
  echo "leave_out: restored ${paths[*]}"
  exit 0
fi
for p in "$@"; do
  p=${p%/}
  [ -n "$(git ls-files -- "$p")" ] || { echo "leave_out: '$p' holds no tracked files" >&2; exit 2; }
  [ -z "$(git status --porcelain -- "$p")" ] || { echo "leave_out: '$p' has uncommitted changes: commit them first" >&2; exit 2; }
done
mkdir -p "$(dirname "$exclude")"
for p in "$@"; do
  p=${p%/}
  git rm -r -q --cached -- "$p"
  echo "/$p/" >>"$exclude"
  echo "$p" >>"$record"
done
bytes=$(( $(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1) ))
echo "leave_out: left out $*; the tracked tree is now $(awk -v b="$bytes" 'BEGIN { printf "%.2f MiB", b / 1048576 }')"

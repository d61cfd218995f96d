#!/usr/bin/env bash
# Job: bring recipe stages back small: each STAGE folder (a run's NN-pass output) with its U-Net
# stored in fp16 and everything else but the VAE when it is the teacher's AutoencoderKL (unchanged
# by distillation; a light AutoencoderTiny decoder comes back, in fp16), plus
# every run's logs, run.json and each stage's stage.json / pocketdiff.json / logs, packed into
# $OUT as NAME.tar (NAME.tar.0, .1, ... over 16 MiB; here: cat NAME.tar* | tar x). A STAGE that
# does not exist is reported and skipped (a stage its run did not reach).
set -euo pipefail
usage() {
  [ $# -eq 0 ] || echo "pack_stages.sh: $*" >&2
  echo "usage: scripts/device/jobs/pack_stages.sh NAME STAGE_DIR..." >&2
  exit 2
}
root=$(cd "$(dirname "$0")/../../.." && pwd)
[ $# -ge 2 ] || usage "takes a NAME and at least one STAGE_DIR"
name=$1
shift
[[ $name =~ ^[A-Za-z0-9._-]+$ && $name != . && $name != .. ]] || usage "NAME '$name' is not a plain name"
# shellcheck source=SCRIPTDIR/../lib.sh
. "$root/scripts/device/lib.sh" || exit 1
cd "$PD_ROOT"
dest=$PD_HOME/pack/$name.d
rm -rf "$dest" && mkdir -p "$dest"
stages=()
for s in "$@"; do
  if [ -d "$s/unet" ]; then stages+=("$s"); else echo "[$name] skipped $s: no such stage"; fi
done
[ ${#stages[@]} -eq 0 ] || python3 - "$dest" "${stages[@]}" <<'PY'
import json
import shutil
import sys
from pathlib import Path

from diffusers import AutoencoderTiny, UNet2DConditionModel

dest = Path(sys.argv[1])
for stage in map(Path, sys.argv[2:]):
    out = dest / stage.parent.name / stage.name
    shutil.copytree(stage, out, ignore=shutil.ignore_patterns("unet", "vae", ".work"))
    UNet2DConditionModel.from_pretrained(stage / "unet").half().save_pretrained(out / "unet")
    vae_config = stage / "vae" / "config.json"
    light = vae_config.is_file() and json.loads(vae_config.read_text()).get("_class_name") == "AutoencoderTiny"
    if light:
        AutoencoderTiny.from_pretrained(stage / "vae").half().save_pretrained(out / "vae")
    print(f"packed {stage} -> {out.relative_to(dest)} (U-Net{' and light decoder' if light else ''} fp16)")
PY
runs=$PD_HOME/runs
(
  cd "$PD_HOME"
  shopt -s nullglob
  for f in runs/*.log runs/*/run.json runs/*/0*/stage.json runs/*/0*/pocketdiff.json runs/*/0*/*.jsonl detached/*.log; do
    mkdir -p "$dest/logs/$(dirname "$f")" && cp "$f" "$dest/logs/$f"
  done
)
[ -d "$runs" ] || echo "[$name] no runs on this machine"
mapfile -t top < <(cd "$dest" && ls -A)
pd_pack "$name" "$dest" "${top[@]}"
echo "[$name] packed ${#stages[@]} stages and the logs into \$OUT/$name.tar*"

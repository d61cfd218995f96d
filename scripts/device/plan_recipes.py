"""Size GPU recipes to the time a session has: iterations from the measured LCM step time.

Reads bench/distill_throughput.py's JSON, takes the fastest mode that ran at the recipe's batch,
and writes each recipe with `iterations` = what fits in TRAIN_SECONDS when `share` processes run
side by side (each then gets about 1/share of the GPU), and `compile` / `teacher_bf16` set to that mode's.
Usage: python3 scripts/device/plan_recipes.py THROUGHPUT_JSON TRAIN_SECONDS SHARE OUT_DIR RECIPE...
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from distill_throughput import MODES  # noqa: E402  (the bench's mode -> settings table)


def main() -> None:
    rows_file, seconds, share, out, *recipes = sys.argv[1:]
    rows = [r for r in json.loads(Path(rows_file).read_text()) if "s_per_step" in r]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for recipe in map(Path, recipes):
        text = recipe.read_text()
        batch = int(re.search(r"^batch_size = (\d+)$", text, re.M).group(1))
        best = min((r for r in rows if r["batch"] == batch), key=lambda r: r["s_per_step"])
        iterations = int(float(seconds) / (best["s_per_step"] * float(share)))
        text = re.sub(r"^iterations = \d+$", f"iterations = {iterations}", text, flags=re.M)
        mode = MODES[best["mode"]]
        text = re.sub(r'^compile = "[^"]*"$', f'compile = "{mode["compile"]}"', text, flags=re.M)
        text = re.sub(r"^teacher_bf16 = \w+$", f"teacher_bf16 = {str(mode['teacher_bf16']).lower()}", text, flags=re.M)
        (out_dir / recipe.name).write_text(text)
        print(f"{recipe.name}: mode {best['mode']} {best['s_per_step']:.4f} s/step at batch {batch}, "
              f"share {share} -> iterations {iterations}")


if __name__ == "__main__":
    main()

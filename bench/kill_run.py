"""`pocketdiff run` killed with SIGKILL at random moments, rerun each time: does it always finish with
the weights of an uninterrupted run, and is nothing left corrupt or half-written?

A tiny recipe (arch:tiny: an LCM training stage with checkpoints every 2 steps, a cast stage, samples)
runs once uninterrupted; then, `--kills` times, a run in another folder is started and SIGKILLed after
a random delay (seeded; a run that finishes first counts as not killed), and finally rerun to the end.
Checked after every kill: no stage folder without its stage.json, and no run ends in an error or a
traceback; after the final rerun: no temporary folder left, and the final U-Net equal to the
uninterrupted one, bit for bit.
Usage: python bench/kill_run.py [--kills 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

RECIPE = """
model = "arch:tiny"
[[pass]]
name = "lcm"
iterations = 12
batch_size = 4
data_limit = 16
warmup = 1
checkpoint_every = 2
[[pass]]
name = "cast"
dtype = "float16"
components = ["unet", "vae"]
[sample]
prompts = ["a photo of a bag"]
steps = 2
"""


def run(recipe: Path, out: Path, kill_after: float | None = None) -> tuple[int | None, str]:
    """Start `pocketdiff run`; SIGKILL it after `kill_after` s (None: let it finish). (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "pocketdiff", "run", str(recipe), "--out", str(out), "--device",
                             "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    return proc.returncode, err


def problems(out: Path, finished: bool) -> list[str]:
    """What a run must never leave: a stage folder without its commit marker (ever), and once a rerun has
    finished, any temporary folder (a SIGKILLed writer's temp is cleaned by the next write, not at once)."""
    found = []
    for child in out.iterdir() if out.is_dir() else []:
        if child.name[:2].isdigit() and child.is_dir() and not (child / "stage.json").is_file():
            found.append(f"{child.name} without stage.json")
        if finished and child.name.startswith("."):
            found.append(f"left behind: {child.name}")
    return found


def unet(out: Path) -> dict:
    return load_file(str(out / "02-cast" / "unet" / "diffusion_pytorch_model.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.toml"
        recipe.write_text(RECIPE)
        t0 = time.monotonic()
        code, err = run(recipe, Path(tmp) / "straight")
        full = time.monotonic() - t0
        assert code == 0, err[-2000:]
        out = Path(tmp) / "killed"
        kills, bad, killed_at = 0, [], []
        for i in range(args.kills):
            delay = rng.uniform(0.5, full)
            code, err = run(recipe, out, kill_after=delay)
            killed_at.append(round(delay, 1))
            kills += code == -signal.SIGKILL
            if code not in (-signal.SIGKILL, 0) or "Traceback" in err:
                bad.append(f"kill {i}: exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}")
            bad += [f"kill {i}: {p}" for p in problems(out, finished=False)]
        code, err = run(recipe, out)
        if code != 0:
            bad.append(f"final rerun: exit {code}: {err[-500:]}")
        bad += [f"after the final rerun: {p}" for p in problems(out, finished=True)]
        a, b = unet(Path(tmp) / "straight"), unet(out)
        same = a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    print(f"uninterrupted run {full:.1f} s; {args.kills} runs started, {kills} SIGKILLed mid-run "
          f"(delays {min(killed_at)}-{max(killed_at)} s), the rest had finished first")
    print(f"problems after a kill: {len(bad)}" + "".join(f"\n  {b}" for b in bad))
    print(f"final U-Net equal to the uninterrupted run: {same}")
    sys.exit(0 if same and not bad else 1)


if __name__ == "__main__":
    main()

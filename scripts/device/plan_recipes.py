"""Size GPU runs to the time left, from a short probe of the same jobs run side by side.

A probe run (scripts/device/jobs/recipe.sh with a short SECONDS) logs every training stage's steps
with their elapsed time (`*_log.jsonl`: in the stage folder once finished, in .work/ until then).
This reads the seconds per step of each PASS named over the later half of its log lines (model loading
does not count, nor the first steps after it, which run slow while cuDNN picks kernels and the caching
allocator grows: a probe that counted them sized a chain's runs to finish well before their time), and prints `pocketdiff run` flags,
`--set PASS.iterations=N ...`, that make those passes together fit in SECONDS: each its SHARE, a
fraction of SECONDS (passes without one split what the others leave equally; shares summing below 1
leave time for work that is not training steps, such as a pass drawing its sampled latents). The jobs
must run beside the same others as in the probe: the rate holds for that load (it only improves as
jobs end).
Usage: python3 scripts/device/plan_recipes.py SECONDS PROBE_RUN_DIR PASS[:SHARE]...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def seconds_per_step(run_dir: Path, pass_name: str) -> float:
    """The pass's logged seconds per step in a probe run folder; SystemExit when it logged too little."""
    logs = sorted(run_dir.glob(f"[0-9][0-9]-{pass_name}/*_log.jsonl")) + \
        sorted(run_dir.glob(f".work/[0-9][0-9]-{pass_name}-*/*_log.jsonl"))
    rows = [json.loads(line) for f in logs[:1] for line in f.read_text().splitlines() if line.strip()]
    if len(rows) < 2 or rows[-1]["step"] <= rows[0]["step"]:
        raise SystemExit(f"plan_recipes: {run_dir} has {len(rows)} log line(s) of pass {pass_name!r}: probe longer "
                         "or log more often (--set PASS.log_every=N)")
    first = rows[(len(rows) - 1) // 2]
    return (rows[-1]["elapsed_s"] - first["elapsed_s"]) / (rows[-1]["step"] - first["step"])


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    seconds, run_dir, specs = float(argv[0]), Path(argv[1]), argv[2:]
    given = {name: float(share) for name, _, share in (s.partition(":") for s in specs) if share}
    rest = [name for name, _, share in (s.partition(":") for s in specs) if not share]
    left = 1.0 - sum(given.values())
    if left < -1e-9 or (rest and left <= 0):
        raise SystemExit(f"plan_recipes: shares {given} leave {left:.2f} of the time for {rest or 'nothing'}")
    shares = {**given, **{name: left / len(rest) for name in rest}}
    flags = []
    for name, share in shares.items():
        rate = seconds_per_step(run_dir, name)
        steps = max(1, int(seconds * share / rate))
        print(f"{run_dir.name}: {name} {rate:.3f} s/step -> {steps} steps in {seconds * share:.0f} s", file=sys.stderr)
        flags += ["--set", f"{name}.iterations={steps}"]
    print(" ".join(flags))


if __name__ == "__main__":
    main(sys.argv[1:])

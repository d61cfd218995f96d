"""Per-image latency of exported pipelines on their runtime, side by side: a student against its teacher.

Each artifact folder is run end to end (text encoder, every U-Net call of its sampler, VAE decoder)
through the validation harness's `ArtifactComponents`, at the sampling settings its model records
(a student: its scheduler and step count; a teacher: `--teacher-steps` with `--teacher-guidance`),
timed with the fair rotating-block method (`runtimes.profiler.compare_latency`). The share of each
component is the time its sessions took during the timed images.
Usage: python bench/image_latency.py STUDENT_ARTIFACTS TEACHER_ARTIFACTS [--blocks 4 --per-block 2]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from pocketdiff.export.base import ArtifactSet, load_builtins
from pocketdiff.runtimes.base import open_session
from pocketdiff.runtimes.harness import ArtifactComponents
from pocketdiff.runtimes.profiler import compare_latency
from pocketdiff.sampler import SampleConfig, generate
from pocketdiff.sources import load_model


class _Timed:
    """A session that adds the seconds of every `run` to a per-component total."""

    def __init__(self, session, totals: dict, name: str):
        self.session, self.totals, self.name = session, totals, name

    def run(self, feeds):
        t0 = time.perf_counter()
        out = self.session.run(feeds)
        self.totals[self.name] += time.perf_counter() - t0
        return out


def pipeline(folder: Path, target: str, fallback: dict, totals: dict):
    """A zero-argument callable drawing one image through `folder`'s artifacts, and its sampler settings."""
    aset = ArtifactSet.load(folder)
    bundle = load_model(aset.model)
    sessions = {a.component: _Timed(open_session(a, folder), totals, a.component)
                for a in aset.artifacts if a.target == target and a.component != "vae_encoder"}
    cfg = SampleConfig.for_bundle(bundle, fallback=fallback, batch_size=1)
    comps = ArtifactComponents(bundle, sessions)
    return (lambda: generate(bundle, ["a photo of a sneaker"], cfg, comps, progress=False)), cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("student", type=Path)
    ap.add_argument("teacher", type=Path)
    ap.add_argument("--target", default="onnx")
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--teacher-scheduler", default="ddim")
    ap.add_argument("--teacher-guidance", type=float, default=4.0)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--per-block", type=int, default=2)
    args = ap.parse_args()
    load_builtins()
    totals = {"student": defaultdict(float), "teacher": defaultdict(float)}
    fallback = {"steps": args.teacher_steps, "scheduler": args.teacher_scheduler,
                "guidance_scale": args.teacher_guidance}
    runners, cfgs = {}, {}
    for name, folder in (("student", args.student), ("teacher", args.teacher)):
        runners[name], cfgs[name] = pipeline(folder, args.target, fallback, totals[name])
    for name in runners:  # warm-up outside the timing: session creation, first-call allocations
        runners[name]()
        totals[name].clear()
    stats = compare_latency(runners, blocks=args.blocks, per_block=args.per_block)
    timed = args.blocks * (args.per_block + 1)  # the untimed first call of each block runs the sessions too
    print(f"{'pipeline':<10}{'sampler':<22}{'median ms':>11}{'p90 ms':>9}  share of session time")
    for name, st in stats.items():
        cfg = cfgs[name]
        spent = sum(totals[name].values())
        shares = ", ".join(f"{c} {100 * t / spent:.1f} %" for c, t in sorted(totals[name].items()))
        p90 = sorted(st.times_s)[min(len(st.times_s) - 1, int(0.9 * len(st.times_s)))]
        print(f"{name:<10}{cfg.scheduler + ' x' + str(cfg.steps) + ' g=' + str(cfg.guidance_scale):<22}"
              f"{1000 * st.median_s:>11.1f}{1000 * p90:>9.1f}  {shares} ({timed} images)")
    print(f"speed-up per image: {stats['teacher'].median_s / stats['student'].median_s:.2f}x")


if __name__ == "__main__":
    main()

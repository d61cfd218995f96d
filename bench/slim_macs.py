"""MACs per call of the slimming rows (BK-SDM presets, prune targets, the light decoder) against the teacher,
without timing anything: `pocketdiff.costs` on the real CPU modules, attention included.
Usage: python bench/slim_macs.py [--model fashion] [--prune 0.1 0.3] [--width 16]"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from slim_latency import PRESETS, cost, pruned, slimmed, with_light_decoder

from pocketdiff.sources import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fashion")
    ap.add_argument("--prune", nargs="*", type=float, default=[0.1, 0.3])
    ap.add_argument("--width", type=int, default=16, help="light decoder width")
    args = ap.parse_args()
    bundle = load_model(args.model)
    teacher = cost(bundle, "unet")[1]
    print(f"teacher unet MACs {teacher:,}")
    for preset in PRESETS:
        macs = cost(slimmed(bundle, preset), "unet")[1]
        print(f"{preset} unet MACs {macs:,} ratio {macs / teacher:.3f}")
    for target in args.prune:
        with tempfile.TemporaryDirectory() as work:
            macs = cost(pruned(bundle, target, Path(work)), "unet")[1]
        print(f"prune {target} unet MACs {macs:,} ratio {macs / teacher:.3f}")
    full, light = cost(bundle, "vae_decoder")[1], cost(with_light_decoder(bundle, args.width), "vae_decoder")[1]
    print(f"vae_decoder teacher {full:,} light w{args.width} {light:,} fewer x{full / light:.1f}")


if __name__ == "__main__":
    main()

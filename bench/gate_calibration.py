"""Calibrate and check the validation gates: clean exports against exports with one planted fault.

Exports a model (default arch:tiny; `fashion` for the built-in) cleanly (direct convolutions, and
Winograd F(2x2,3x3) and F(4x4,3x3) everywhere, which round differently) and plants one fault at a time into copies of the
clean graph: one U-Net attention projection x1.01, one VAE-decoder convolution x1.01, one NaN
U-Net weight. Each folder goes through `pocketdiff validate`'s harness; prints per-component relative
L2, the end-to-end PSNR, the verdict and whom it blames. A clean export must pass and every fault fail.
Usage: python bench/gate_calibration.py [--model arch:tiny] [--precisions fp32,fp16] [--targets onnx]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pocketdiff.export.base import ExportOptions, export_bundle
from pocketdiff.runtimes.harness import COMPONENT_GATES, GATES_DB, ValidateConfig, validate
from pocketdiff.sources import load_model

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# (fault name, component, node-name fragment of the layer whose weight changes, change, precisions whose
# gates must catch it: a x1.01 change is below fp16's rounding noise, see docs/BENCHMARKS.md "Loaders and gates")
FAULTS: list[tuple[str, str, str, Callable[[np.ndarray], np.ndarray], tuple[str, ...]]] = [
    ("unet attn1.to_q x1.01", "unet", "/attentions.0/transformer_blocks.0/attn1/to_q/", lambda w: w * 1.01, ("fp32",)),
    ("vae_decoder conv x1.01", "vae_decoder", "/up_blocks.0/resnets.0/conv1/", lambda w: w * 1.01, ("fp32",)),
    ("unet one weight NaN", "unet", "/down_blocks.0/resnets.0/conv1/", lambda w: _nan_first(w), ("fp32", "fp16")),
]


def _nan_first(w: np.ndarray) -> np.ndarray:
    w = w.copy()
    w.flat[0] = np.nan
    return w


def plant(model_path: Path, fragment: str, change: Callable[[np.ndarray], np.ndarray]) -> str:
    """Apply `change` to the weight of the first node whose name contains `fragment`; returns the node name."""
    model = onnx.load(str(model_path))
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        weights = [inits[i] for i in node.input if i in inits and len(inits[i].dims) >= 2]
        if fragment in node.name and weights:
            w = numpy_helper.to_array(weights[0])
            weights[0].CopyFrom(numpy_helper.from_array(change(w).astype(w.dtype), weights[0].name))
            onnx.save(model, str(model_path))
            return node.name
    raise SystemExit(f"no node matching {fragment!r} in {model_path}")


def run_case(label: str, folder: Path, bundle: object, config: ValidateConfig) -> dict:
    """Validate one folder and print one row per target."""
    t0 = time.monotonic()
    report = validate(folder, bundle=bundle, config=config)
    for t in report["targets"]:
        rels = "  ".join(f"{c} {t['components'][c]['rel_l2']:.2e}" for c in COMPONENTS if c in t["components"])
        layer = (t.get("first_diverging_layer") or {}).get("layer", "-")
        print(f"{label:<26} {t['target']:<10} {t['precision']}  {rels}  e2e {t['psnr_db']:.2f} dB  {t['status']:<6}"
              f"  blames {','.join(t['failed_components']) or '-'}  layer {layer}  ({time.monotonic() - t0:.0f} s)",
              flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="arch:tiny")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--targets", default="onnx", help="comma-separated; faults are planted in ONNX graphs only")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    bundle = load_model(args.model)
    config = ValidateConfig(steps=args.steps)
    targets = args.targets.split(",")
    print(f"gates: end to end {GATES_DB}; per component rel L2 {COMPONENT_GATES}")
    wrong = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            for winograd in ("off", "f2", "f4"):
                folder = Path(tmp) / f"{precision}-{winograd}"
                t0 = time.monotonic()
                export_bundle(bundle, args.model, targets, ExportOptions(components=COMPONENTS, precision=precision,
                              extra={"winograd": winograd}), folder)
                print(f"exported {precision} winograd={winograd} in {time.monotonic() - t0:.0f} s", flush=True)
                report = run_case(f"clean winograd={winograd}", folder, bundle, config)
                wrong += [f"clean {precision} {winograd}"] if not report["passed"] else []
            clean = Path(tmp) / f"{precision}-off"
            for name, component, fragment, change, caught_at in FAULTS:
                folder = Path(tmp) / f"{precision}-{name.replace(' ', '_')}"
                shutil.copytree(clean, folder)
                plant(folder / "onnx" / component / "model.onnx", fragment, change)
                report = run_case(name, folder, bundle, config)
                (t,) = [t for t in report["targets"] if t["target"] == "onnx"]
                caught = t["status"] == "failed" and t["failed_components"][:1] == [component]
                if caught != (precision in caught_at):
                    wrong.append(f"{name} {precision}")
    print("all verdicts as intended (clean passes; each fault fails, blaming its component, where its precision "
          "can see it)" if not wrong else f"verdicts not as intended: {', '.join(wrong)}")


if __name__ == "__main__":
    main()

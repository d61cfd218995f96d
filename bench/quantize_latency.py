"""U-Net call latency of the fp32 and the quantized ONNX artifacts, side by side in one run, with sizes and quality.

The model is exported once in fp32 (pocketdiff's default graph, Winograd where its table says, and the direct-convolution
graph the quantizers start from) and once per scheme through `pocketdiff export --quantize` (calibration recorded along the model's own
sampler; the gate runs and its figures are kept: end-to-end PSNR against the float model's images,
prompt accuracy). The U-Net artifacts are then timed on onnxruntime's CPU provider at the CFG call
shape (batch 2, native resolution) with the fair rotating-block method
(`runtimes.profiler.compare_latency`); the ratio is fp32 median over quantized median.

    flock /tmp/heavy.lock .venv/bin/python bench/quantize_latency.py fashion --schemes w8a8,w8 --blocks 6 --per-block 5
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from pocketdiff.bundle import Bundle
from pocketdiff.compress.quantize.calibration import CalibrationSet, record_calibration
from pocketdiff.compress.quantize.spec import make_spec
from pocketdiff.errors import GateError
from pocketdiff.export.base import ArtifactSet, ExportOptions, export_bundle
from pocketdiff.export.components import example_inputs
from pocketdiff.export.quantize import Quantization, QuantizeExport, check_quantization
from pocketdiff.runtimes.base import open_session
from pocketdiff.runtimes.harness import FALLBACK
from pocketdiff.runtimes.profiler import LatencyStats, compare_latency, speedup
from pocketdiff.runtimes.quantize_gate import QuantizationGate
from pocketdiff.sampler import SampleConfig
from pocketdiff.sources import load_model

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
RUNTIME_NAMES = {"onnx": "onnxruntime CPU", "executorch": "ExecuTorch runtime, XNNPACK"}


def cpu_model() -> str:
    """lscpu's model name."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def recorded_calibration(bundle: Bundle, model: str) -> CalibrationSet:
    """The calibration set along the model's own sampler (what `pocketdiff export --quantize` records), after
    printing the date, CPU and model line and then one line saying what was recorded."""
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}  {cpu_model()}  model {model}", flush=True)
    calibration = record_calibration(bundle, SampleConfig.for_bundle(bundle, fallback=FALLBACK))
    meta = calibration.meta
    print(f"calibration: {calibration.calls} U-Net calls over {len(meta['prompts'])} prompts ({meta['scheduler']} "
          f"{meta['steps']} steps, guidance {meta['guidance_scale']}, seed {meta['seed']})", flush=True)
    return calibration


def rel_l2(out: np.ndarray, ref: np.ndarray) -> float:
    """Relative L2 distance of `out` from `ref`, in float64."""
    ref = ref.astype(np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def time_unets(bundle: Bundle, folders: dict[str, Path], target: str, blocks: int,
               per_block: int) -> tuple[dict[str, ArtifactSet], dict[str, np.ndarray], dict[str, LatencyStats]]:
    """Open each folder's `target` U-Net in its runtime, run the CFG-pair call (batch 2, native resolution) once
    for its output, then time them side by side (`compare_latency`); prints the header line. Returns the
    artifact sets, outputs and timings by folder name."""
    feeds = {k: v.numpy() for k, v in example_inputs(bundle, "unet", batch=2).items()}
    sets = {name: ArtifactSet.load(folder) for name, folder in folders.items()}
    sessions = {name: open_session(aset.find(target, "unet"), folders[name]) for name, aset in sets.items()}
    outputs = {name: s.run(feeds)["out_sample"] for name, s in sessions.items()}
    stats = compare_latency({name: (lambda s=s: s.run(feeds)) for name, s in sessions.items()},
                            blocks=blocks, per_block=per_block)
    print(f"U-Net call, batch 2 (CFG pair), {feeds['sample'].shape[2]}x{feeds['sample'].shape[3]} latents, "
          f"{blocks} blocks x {per_block} timed calls, {RUNTIME_NAMES[target]}", flush=True)
    return sets, outputs, stats


def main() -> None:
    """Export, gate and time; print one table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="fashion")
    ap.add_argument("--schemes", default="w8a8,w8")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--per-block", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)  # torch only draws the reference images; onnxruntime's sessions keep their defaults
    bundle = load_model(args.model)
    calibration = recorded_calibration(bundle, args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"fp32": Path(tmp) / "fp32", "fp32-direct": Path(tmp) / "fp32-direct"}
        export_bundle(bundle, args.model, ["onnx"], ExportOptions(components=COMPONENTS), folders["fp32"])
        export_bundle(bundle, args.model, ["onnx"], ExportOptions(components=COMPONENTS, extra={"winograd": "off"}),
                      folders["fp32-direct"])  # the float graph the quantizers start from
        gates = {}
        for scheme in args.schemes.split(","):
            spec = make_spec(scheme, COMPONENTS)
            options = check_quantization(["onnx"], spec, ExportOptions(components=COMPONENTS))
            gate = QuantizationGate(bundle)
            folders[scheme] = Path(tmp) / scheme
            step = QuantizeExport(bundle, Quantization(spec, calibration if spec.needs_calibration else None), gate)
            try:
                export_bundle(bundle, args.model, ["onnx"], options, folders[scheme], step=step)
            except GateError as e:
                print(f"{scheme}: {e}")
                folders.pop(scheme)
                continue
            gates[scheme] = gate.report["targets"][0]
        sets, outputs, stats = time_unets(bundle, folders, "onnx", args.blocks, args.per_block)
        ref = outputs["fp32"]
        for name, aset in sets.items():
            unet = aset.find("onnx", "unet")
            q = unet.details.get("quantization", {})
            sizes = "  ".join(f"{a.component} {a.details['bytes'] / 1e6:.2f} MB" for a in aset.artifacts)
            rel = rel_l2(outputs[name], ref)
            line = (f"{name:<11} median {stats[name].median_s * 1e3:7.2f} ms  x{speedup(stats, 'fp32', name):.2f} vs fp32  "
                    f"U-Net {q.get('bits_per_weight', 32.0):.2f} bits/weight  rel L2 {rel:.3g}  {sizes}")
            if name in gates:
                g = gates[name]
                acc = g["prompt_accuracy"]
                line += (f"  e2e PSNR {g['psnr_db']:.2f} dB (gate {g['gate_db']})  prompt accuracy "
                         f"{acc.get('quantized', float('nan')):.2f} (float {acc.get('float', float('nan')):.2f})")
            print(line, flush=True)


if __name__ == "__main__":
    main()

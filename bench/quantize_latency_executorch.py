"""U-Net call latency of the fp32 and the int8 (PT2E static, XNNPACK) ExecuTorch U-Net, side by side in one run.

The U-Net is exported once in fp32 for ExecuTorch (pocketdiff's XNNPACK lowering, direct convolutions, the
CFG call shape only: batch 2 at native resolution), then a copy of that folder goes through the same
quantize step and gate `pocketdiff export --targets executorch --components unet --quantize w8a8` runs
(`QuantizeExport.finish`, then its check: calibration recorded along the model's own sampler, end-to-end
PSNR against the float model's images, prompt accuracy), so the slow lowering runs twice, not three
times. Both programs are timed in ExecuTorch's runtime with the fair rotating-block method
(`runtimes.profiler.compare_latency`); each row shows its size, ops left outside the XNNPACK delegate, the
U-Net output's relative L2 against fp32, and for int8 the gate's figures.

    flock /tmp/heavy.lock .venv/bin/python bench/quantize_latency_executorch.py fashion --blocks 6 --per-block 5
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from pocketdiff.compress.quantize.spec import make_spec
from pocketdiff.errors import GateError
from pocketdiff.export.base import ArtifactSet, ExportOptions, export_bundle
from pocketdiff.export.executorch_quantize import outside_delegate
from pocketdiff.export.quantize import Quantization, QuantizeExport, check_quantization
from pocketdiff.runtimes.profiler import speedup
from pocketdiff.runtimes.quantize_gate import QuantizationGate
from pocketdiff.sources import load_model
from quantize_latency import recorded_calibration, rel_l2, time_unets

COMPONENTS = ("unet",)


def main() -> None:
    """Export, quantize, gate and time; print one table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="fashion")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--per-block", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)  # torch only draws the reference images; ExecuTorch's XNNPACK keeps its defaults
    bundle = load_model(args.model)
    calibration = recorded_calibration(bundle, args.model)
    spec = make_spec("w8a8", COMPONENTS)
    options = check_quantization(["executorch"], spec, ExportOptions(components=COMPONENTS, batch_sizes=(2,)))
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"fp32": Path(tmp) / "fp32", "w8a8": Path(tmp) / "w8a8"}
        export_bundle(bundle, args.model, ["executorch"], options, folders["fp32"])
        fp32_seconds = ArtifactSet.load(folders["fp32"]).find("executorch", "unet").details["export_seconds"]
        print(f"fp32 lowering {fp32_seconds:.0f} s", flush=True)
        shutil.copytree(folders["fp32"], folders["w8a8"])
        gate = QuantizationGate(bundle)
        step = QuantizeExport(bundle, Quantization(spec, calibration), gate)
        aset = ArtifactSet.load(folders["w8a8"])
        aset.artifacts = [step.finish(a, folders["w8a8"]) for a in aset.artifacts]
        aset.quantization = step.manifest_entry
        aset.save(folders["w8a8"])
        try:
            step.check(folders["w8a8"], aset)
        except GateError as e:
            print(f"w8a8: {e}", flush=True)
        g = gate.report["targets"][0]
        sets, outputs, stats = time_unets(bundle, folders, "executorch", args.blocks, args.per_block)
        ref = outputs["fp32"]
        for name, aset in sets.items():
            unet = aset.find("executorch", "unet")
            q = unet.details.get("quantization", {})
            rel = rel_l2(outputs[name], ref)
            outside = outside_delegate(unet.details["ops"])
            line = (f"{name:<5} median {stats[name].median_s * 1e3:7.2f} ms  x{speedup(stats, 'fp32', name):.2f} vs fp32  "
                    f"unet {unet.details['bytes'] / 1e6:.2f} MB  {q.get('bits_per_weight', 32.0):.2f} bits/weight  "
                    f"ops outside delegate {outside}  delegates {[c['delegates'] for c in unet.details['ops'].values()]}  "
                    f"rel L2 {rel:.3g}")
            if q:
                acc = g["prompt_accuracy"]
                line += (f"  lowering {unet.details['quantize_seconds']:.0f} s  e2e PSNR {g['psnr_db']:.2f} dB "
                         f"(gate {g['gate_db']}, {g['status']})  prompt accuracy {acc.get('quantized', float('nan')):.2f} "
                         f"(float {acc.get('float', float('nan')):.2f})")
            print(line, flush=True)
        print("outside the delegate (w8a8):", sets["w8a8"].find("executorch", "unet").details["ops"], flush=True)


if __name__ == "__main__":
    main()

"""U-Net call latency of the fp32 and the quantized ExecuTorch (XNNPACK) U-Nets, side by side in one run.

The U-Net is exported once in fp32 for ExecuTorch (pocketdiff's XNNPACK lowering, direct convolutions, the
CFG call shape only: batch 2 at native resolution), then a copy of that folder per scheme goes through the
same quantize step and gate `pocketdiff export --targets executorch --components unet --quantize SCHEME`
runs (`QuantizeExport.finish`, then its check: end-to-end PSNR against the float model's images, prompt
accuracy; w8a8 calibrates along the model's own sampler), so the float lowering runs once. A scheme whose
program fails to lower or to run is reported on its own line and left out of the timing. The rest are timed
in ExecuTorch's runtime with the fair rotating-block method (`runtimes.profiler.compare_latency`); each row
shows its size, ops left outside the XNNPACK delegate, the U-Net output's relative L2 against fp32 and the
gate's figures.

    flock /tmp/heavy.lock .venv/bin/python bench/quantize_latency_executorch.py fashion --schemes 8da8w,8da4w,w8a8 --blocks 6 --per-block 5
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from pocketdiff.compress.quantize.spec import make_spec
from pocketdiff.errors import PocketdiffError
from pocketdiff.export.base import ArtifactSet, ExportOptions, export_bundle
from pocketdiff.export.executorch_quantize import outside_delegate
from pocketdiff.export.quantize import Quantization, QuantizeExport, check_quantization
from pocketdiff.runtimes.profiler import speedup
from pocketdiff.runtimes.quantize_gate import QuantizationGate
from pocketdiff.sources import load_model
from quantize_latency import recorded_calibration, rel_l2, time_unets

COMPONENTS = ("unet",)


def quantize_copy(bundle, scheme: str, calibration, fp32: Path, folder: Path) -> dict:
    """The fp32 folder copied to `folder` and quantized there with `scheme` by the export's own step; returns
    the gate's report for the target (a scheme whose program fails to run gets {})."""
    spec = make_spec(scheme, COMPONENTS)
    check_quantization(["executorch"], spec, ExportOptions(components=COMPONENTS, batch_sizes=(2,)))
    shutil.copytree(fp32, folder)
    gate = QuantizationGate(bundle)
    step = QuantizeExport(bundle, Quantization(spec, calibration if spec.needs_calibration else None), gate)
    aset = ArtifactSet.load(folder)
    aset.artifacts = [step.finish(a, folder) for a in aset.artifacts]
    aset.quantization = step.manifest_entry
    aset.save(folder)
    try:
        step.check(folder, aset)
    except PocketdiffError as e:  # a missed gate keeps its figures in the report; a runtime failure has none
        print(f"{scheme}: {e}", flush=True)
    return gate.report["targets"][0] if gate.report else {}


def main() -> None:
    """Export, quantize, gate and time; print one table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="fashion")
    ap.add_argument("--schemes", default="8da8w,8da4w,w8a8")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--per-block", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)  # torch only draws the reference images; ExecuTorch's XNNPACK keeps its defaults
    bundle = load_model(args.model)
    schemes = args.schemes.split(",")
    calibration = recorded_calibration(bundle, args.model) if "w8a8" in schemes else None
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"fp32": Path(tmp) / "fp32"}
        export_bundle(bundle, args.model, ["executorch"], ExportOptions(components=COMPONENTS, batch_sizes=(2,),
                                                                        extra={"winograd": "off"}), folders["fp32"])
        fp32_seconds = ArtifactSet.load(folders["fp32"]).find("executorch", "unet").details["export_seconds"]
        print(f"fp32 lowering {fp32_seconds:.0f} s", flush=True)
        gates = {}
        for scheme in schemes:
            gates[scheme] = quantize_copy(bundle, scheme, calibration, folders["fp32"], Path(tmp) / scheme)
            if gates[scheme].get("psnr_db") is None:
                print(f"{scheme}: no figures (see the line above); left out of the timing", flush=True)
                continue
            folders[scheme] = Path(tmp) / scheme
        sets, outputs, stats = time_unets(bundle, folders, "executorch", args.blocks, args.per_block)
        for name, aset in sets.items():
            unet = aset.find("executorch", "unet")
            q = unet.details.get("quantization", {})
            line = (f"{name:<6} median {stats[name].median_s * 1e3:7.2f} ms  x{speedup(stats, 'fp32', name):.2f} vs fp32  "
                    f"unet {unet.details['bytes'] / 1e6:.2f} MB  {q.get('bits_per_weight', 32.0):.2f} bits/weight  "
                    f"ops outside delegate {outside_delegate(unet.details['ops'])}  "
                    f"delegates {[c['delegates'] for c in unet.details['ops'].values()]}  "
                    f"rel L2 {rel_l2(outputs[name], outputs['fp32']):.3g}")
            if q:
                g, acc = gates[name], gates[name]["prompt_accuracy"]
                line += (f"  lowering {unet.details['quantize_seconds']:.0f} s  e2e PSNR {g['psnr_db']:.2f} dB "
                         f"(gate {g['gate_db']}, {g['status']})  prompt accuracy {acc.get('quantized', float('nan')):.2f} "
                         f"(float {acc.get('float', float('nan')):.2f})")
            print(line, flush=True)
            print(f"  outside the delegate ({name}):", unet.details["ops"], flush=True)


if __name__ == "__main__":
    main()

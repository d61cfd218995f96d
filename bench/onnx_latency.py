"""U-Net call latency: pocketdiff's ONNX export against a plain torch.onnx.export, same model, same run.

Both graphs run in onnxruntime on the CPU provider with default session options. The plain export is
`torch.onnx.export` of the U-Net as diffusers builds it (its default SDPA attention), TorchScript
path at the same opset, so the two differ only in what pocketdiff changes. Calls are interleaved
(plain, pocketdiff, plain, ...) so machine noise hits both alike; medians are reported.

    flock /tmp/heavy.lock .venv/bin/python bench/onnx_latency.py fashion arch:sd15 --calls 20 3
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pocketdiff.export.attention import count_onnx_fused
from pocketdiff.export.base import ExportOptions
from pocketdiff.export.components import example_inputs, wrap
from pocketdiff.export.onnx import OnnxExporter, trace_to_onnx
from pocketdiff.sources import load_model


def cpu_model() -> str:
    """lscpu model name and core count."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    return f"{name}, {torch.get_num_threads()} threads / {len(__import__('os').sched_getaffinity(0))} cores"


def bench_model(spec: str, calls: int, batch: int, precision: str, winograd: str, work: Path) -> dict:
    """Export both graphs of one model's U-Net and time them interleaved."""
    bundle = load_model(spec)
    feeds_t = example_inputs(bundle, "unet", batch)
    t0 = time.perf_counter()
    art = OnnxExporter().export(bundle, "unet", ExportOptions(components=("unet",), precision=precision,
                                                              batch_sizes=(batch,), extra={"winograd": winograd}),
                                work / "ours")
    ours_export = time.perf_counter() - t0
    ours_path = work / "ours" / art.path
    spec_u = wrap(bundle, "unet")
    plain_path = work / "plain" / "model.onnx"
    plain_path.parent.mkdir(parents=True)
    t0 = time.perf_counter()
    trace_to_onnx(spec_u.module, feeds_t, spec_u.input_names, spec_u.output_names, spec_u.dynamic_axes, plain_path)
    plain_export = time.perf_counter() - t0
    if precision == "fp16":
        import onnx

        from pocketdiff.export.onnx import save_model, to_fp16

        plain16 = work / "plain16" / "model.onnx"
        save_model(to_fp16(onnx.load(str(plain_path)), "timestep"), plain16)
        plain_path = plain16
    resolution = bundle.resolution
    del bundle, spec_u
    gc.collect()
    sessions = {"plain": ort.InferenceSession(str(plain_path), providers=["CPUExecutionProvider"]),
                "pocketdiff": ort.InferenceSession(str(ours_path), providers=["CPUExecutionProvider"])}
    feeds = {}
    for name, sess in sessions.items():
        types = {i.name: i.type for i in sess.get_inputs()}
        feeds[name] = {k: v.numpy().astype(np.float16 if types[k] == "tensor(float16)" else v.numpy().dtype)
                       for k, v in feeds_t.items()}
    outs = {n: s.run(None, feeds[n])[0] for n, s in sessions.items()}  # warm-up call
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(calls):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feeds[name])
            times[name].append(time.perf_counter() - t0)
    diff = float(np.abs(outs["plain"].astype(np.float64) - outs["pocketdiff"]).max())
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"model": spec, "batch": batch, "resolution": resolution, "precision": precision,
            "calls": calls, "median_s": med, "min_s": {n: min(t) for n, t in times.items()},
            "speedup": med["plain"] / med["pocketdiff"],
            "fused_attention": {"plain": count_onnx_fused(plain_path), "pocketdiff": count_onnx_fused(ours_path)},
            "winograd": art.details.get("winograd"), "max_abs_diff": diff,
            "export_s": {"plain": round(plain_export, 1), "pocketdiff": round(ours_export, 1)}}


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--calls", type=int, nargs="+", default=[10], help="timed calls per model (one per model or one for all)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--winograd", choices=["auto", "off", "f2", "f4"], default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    calls = args.calls * len(args.models) if len(args.calls) == 1 else args.calls
    header = {"date": datetime.date.today().isoformat(), "machine": cpu_model(), "python": platform.python_version(),
              "onnxruntime": ort.__version__, "torch": torch.__version__, "command": " ".join(sys.argv)}
    print(json.dumps(header))
    results = []
    for spec, n in zip(args.models, calls):
        with tempfile.TemporaryDirectory() as tmp:
            r = bench_model(spec, n, args.batch, args.precision, args.winograd, Path(tmp))
        results.append(r)
        print(f"{spec} batch {r['batch']} {r['resolution']}px {r['precision']}: plain {r['median_s']['plain']*1e3:.1f} ms, "
              f"pocketdiff {r['median_s']['pocketdiff']*1e3:.1f} ms (median of {n}), speedup {r['speedup']:.2f}x; "
              f"fused attention plain {r['fused_attention']['plain']} / pocketdiff {r['fused_attention']['pocketdiff']}; "
              f"winograd {r['winograd']}; max |diff| {r['max_abs_diff']:.2e}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({**header, "results": results}, indent=2))


if __name__ == "__main__":
    main()

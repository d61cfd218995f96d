"""U-Net call latency: pocketdiff's ONNX export against a plain torch.onnx.export, same model, same run.

Both graphs run in onnxruntime on the CPU provider with default session options. The plain export is
`torch.onnx.export` of the U-Net as diffusers builds it (its default SDPA attention), TorchScript
path at the same opset, so the two differ only in what pocketdiff changes. Calls are made in
alternating blocks (`pocketdiff.runtimes.profiler.compare_latency`: one untimed call, then --calls
timed ones, per graph per block) so machine noise hits both alike; medians are reported.

    flock /tmp/heavy.lock .venv/bin/python bench/onnx_latency.py fashion arch:sd15 --calls 5 1 --blocks 6 3

`--profile N` then runs each graph N more times under onnxruntime's profiler and prints where the time
goes (each kernel's median over the N calls), by kernel type and by role in the U-Net (linear layers,
attention, Winograd products and transforms, ...), after onnxruntime's own graph rewrites, so these are
the kernels that really ran.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pocketdiff.export.base import ExportOptions
from pocketdiff.export.components import example_inputs, wrap
from pocketdiff.export.onnx import OnnxExporter, count_onnx_fused, trace_to_onnx
from pocketdiff.runtimes.profiler import compare_latency, speedup
from pocketdiff.sources import load_model


def cpu_model() -> str:
    """lscpu model name and core count."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    return f"{name}, {torch.get_num_threads()} threads / {len(__import__('os').sched_getaffinity(0))} cores"


def _role(name: str, op: str, inputs: list[dict]) -> str:
    """What a profiled kernel does in a U-Net graph, for the time breakdown by role."""
    scope = name.rsplit("/", 1)[0]
    if "/winograd" in name:
        return "Winograd products" if op == "MatMul" else "Winograd transforms, pads, slices"
    if op in ("MultiHeadAttention", "Attention"):
        return "fused attention"
    if op == "Softmax" or (op == "MatMul" and re.search(r"/attn\d+$", scope)):
        return "attention products and softmax (unfused)"
    if op in ("MatMul", "Gemm", "FusedMatMul"):
        return "linear layers"
    if op in ("Conv", "FusedConv", "NchwcConv"):
        kernel = next(iter(inputs[1].values()))[2:] if len(inputs) > 1 else []
        return "1x1 convolutions" if kernel == [1, 1] else "other convolutions"
    if op.startswith("Reorder"):
        return "NCHWc layout reorders"
    return "everything else"


def op_profile(path: Path, feeds: dict[str, np.ndarray], runs: int, work: Path) -> dict[str, dict[str, float]]:
    """Kernel ms per call by op type and by role: each kernel's median over `runs` profiled calls (after a warm-up).

    Medians per kernel, not means: on a shared host one preempted call of a kernel can take tens of times its usual time.
    """
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / f"profile_{path.parent.name}")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    t_start = time.perf_counter()
    for _ in range(runs):
        sess.run(None, feeds)
    wall_ms = (time.perf_counter() - t_start) * 1e3 / runs
    events = json.loads(Path(sess.end_profiling()).read_text())
    first_timed = [e for e in events if e.get("name") == "model_run"][-runs]["ts"]
    durations: dict[str, list[float]] = {}
    kinds: dict[str, tuple[str, str]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_timed:
            node, op = e["name"][: -len("_kernel_time")], e["args"]["op_name"]
            durations.setdefault(node, []).append(e["dur"] / 1e3)
            kinds[node] = (op, _role(node, op, e["args"].get("input_type_shape", [])))
    by_op: dict[str, float] = {}
    by_role: dict[str, float] = {}
    for node, ds in durations.items():
        op, role = kinds[node]
        by_op[op] = by_op.get(op, 0.0) + float(np.median(ds))
        by_role[role] = by_role.get(role, 0.0) + float(np.median(ds))
    ordered = lambda d: dict(sorted(d.items(), key=lambda kv: -kv[1]))  # noqa: E731
    return {"wall_ms": wall_ms, "kernel_ms": sum(by_op.values()), "by_op": ordered(by_op), "by_role": ordered(by_role)}


def bench_model(spec: str, calls: int, blocks: int, batch: int, precision: str, winograd: str, work: Path,
                profile: int = 0) -> dict:
    """Export both graphs of one model's U-Net and time them side by side in alternating blocks."""
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
    paths = {"plain": plain_path, "pocketdiff": ours_path}
    sessions = {n: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for n, p in paths.items()}
    feeds = {}
    for name, sess in sessions.items():
        types = {i.name: i.type for i in sess.get_inputs()}
        feeds[name] = {k: v.numpy().astype(np.float16 if types[k] == "tensor(float16)" else v.numpy().dtype)
                       for k, v in feeds_t.items()}
    outs = {n: s.run(None, feeds[n])[0] for n, s in sessions.items()}
    stats = compare_latency({n: (lambda s=s, f=feeds[n]: s.run(None, f)) for n, s in sessions.items()}, blocks, calls)
    diff = float(np.abs(outs["plain"].astype(np.float64) - outs["pocketdiff"]).max())
    profiles = {n: op_profile(paths[n], feeds[n], profile, work) for n in sessions} if profile else {}
    return {"model": spec, "batch": batch, "resolution": resolution, "precision": precision, "profile_ms": profiles,
            "calls": {"blocks": blocks, "timed_per_block": calls}, "latency": {n: v.as_dict() for n, v in stats.items()},
            "speedup": speedup(stats, "plain", "pocketdiff"),
            "fused_attention": {"plain": count_onnx_fused(plain_path), "pocketdiff": count_onnx_fused(ours_path)},
            "winograd": art.details.get("winograd"), "max_abs_diff": diff,
            "export_s": {"plain": round(plain_export, 1), "pocketdiff": round(ours_export, 1)}}


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--calls", type=int, nargs="+", default=[3], help="timed calls per block (one per model or one for all)")
    p.add_argument("--blocks", type=int, nargs="+", default=[5], help="blocks per graph (one per model or one for all)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--winograd", choices=["auto", "off", "f2", "f4"], default="auto")
    p.add_argument("--profile", type=int, default=0, help="also profile each graph over this many calls")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    calls = args.calls * len(args.models) if len(args.calls) == 1 else args.calls
    blocks = args.blocks * len(args.models) if len(args.blocks) == 1 else args.blocks
    header = {"date": datetime.date.today().isoformat(), "machine": cpu_model(), "python": platform.python_version(),
              "onnxruntime": ort.__version__, "torch": torch.__version__, "command": " ".join(sys.argv)}
    print(json.dumps(header))
    results = []
    for spec, n, nb in zip(args.models, calls, blocks):
        with tempfile.TemporaryDirectory() as tmp:
            r = bench_model(spec, n, nb, args.batch, args.precision, args.winograd, Path(tmp), args.profile)
        results.append(r)
        lat = r["latency"]
        print(f"{spec} batch {r['batch']} {r['resolution']}px {r['precision']}: plain {lat['plain']['median_s']*1e3:.1f} ms, "
              f"pocketdiff {lat['pocketdiff']['median_s']*1e3:.1f} ms (median of {nb} blocks x {n}), "
              f"speedup {r['speedup']:.2f}x; "
              f"fused attention plain {r['fused_attention']['plain']} / pocketdiff {r['fused_attention']['pocketdiff']}; "
              f"winograd {r['winograd']}; max |diff| {r['max_abs_diff']:.2e}", flush=True)
        for name, prof in r["profile_ms"].items():
            kernels = ", ".join(f"{op} {ms:.1f}" for op, ms in list(prof["by_op"].items())[:12])
            roles = ", ".join(f"{role} {ms:.1f}" for role, ms in prof["by_role"].items())
            print(f"  {name} profile, ms per call ({prof['wall_ms']:.1f} wall, {prof['kernel_ms']:.1f} in kernels): "
                  f"by op type: {kernels}; by role: {roles}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({**header, "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Export at scale and ExecuTorch latency: what docs/BENCHMARKS.md's "Core ML / ExecuTorch export" section prints.

    python bench/export_scale.py scale --model arch:sd15 --targets onnx,coreml,executorch --out runs/scale
        one subprocess per (target, component): export seconds, peak RSS (wait4), artifact bytes
    python bench/export_scale.py latency --model fashion --component unet
        pocketdiff's ExecuTorch lowering vs a plain XNNPACK lowering, same model, same run; ratio printed
        (each lowering in its own process: `lower`)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def export_one(model: str, target: str, component: str, out: Path) -> dict:
    """Export one component for one target (run inside its own process); returns the Artifact's figures."""
    from pocketdiff.export.base import ExportOptions, get_exporter, load_builtins
    from pocketdiff.sources import load_model

    load_builtins()
    bundle = load_model(model)
    opts = ExportOptions(components=(component,), batch_sizes=(1,), extra={"deployment_target": "iOS18"})
    a = get_exporter(target).export(bundle, component, opts, out)
    path = out / a.path
    # ONNX keeps external weight files beside model.onnx; an .mlpackage is a folder; a .pte is one file
    folder = path if path.is_dir() else (path.parent if target == "onnx" else None)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder else path.stat().st_size
    return {"target": target, "component": component, "path": a.path, "bytes": size,
            "fused_attention": a.details.get("fused_attention")}


def scale(model: str, targets: list[str], components: list[str], out: Path, timeout_s: float) -> list[dict]:
    """One subprocess per export (killed after `timeout_s`); wall time and the child's peak RSS from wait4."""
    rows = []
    for target in targets:
        for component in components:
            dest = out / f"{target}-{component}"
            dest.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "one", "--model", model, "--target", target,
                   "--component", component, "--out", str(dest)]
            start = time.perf_counter()
            log = dest / "export.log"
            with log.open("w") as sink:
                proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True)
                timer = threading.Timer(timeout_s, proc.kill)
                timer.start()
                _, status, usage = os.wait4(proc.pid, 0)
                timer.cancel()
            row = {"target": target, "component": component, "seconds": round(time.perf_counter() - start, 1),
                   "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "exit": os.waitstatus_to_exitcode(status)}
            lines = log.read_text(errors="replace").splitlines()
            last = [ln for ln in lines if ln.startswith("{")]
            if row["exit"] == 0 and last:
                row.update(json.loads(last[-1]))
            else:
                killed = row["exit"] == -9 and row["seconds"] >= timeout_s
                row["error"] = f"killed after {timeout_s} s" if killed else " | ".join(lines[-3:])[-400:]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def lower_one(model: str, component: str, batch: int, which: str, out: Path, winograd: str = "auto") -> dict:
    """Lower one component with pocketdiff's or the plain XNNPACK lowering (inside its own process) to `out`."""
    from pocketdiff.export.components import example_inputs, wrap
    from pocketdiff.export.executorch import method_name, plain_xnnpack_lowering, pocketdiff_lowering
    from pocketdiff.sources import load_model

    bundle = load_model(model)
    spec = wrap(bundle, component)
    feeds = example_inputs(bundle, component, batch)
    t = time.perf_counter()
    layers: dict = {}
    if which == "pocketdiff":
        data, details = pocketdiff_lowering(spec.module, {method_name(feeds): feeds}, component, winograd=winograd)
        ops = details["ops"][method_name(feeds)]
        rewritten = details["winograd"]["rewritten"]
        layers = {"mode": winograd, "eligible": details["winograd"]["eligible"],
                  "rewritten": {f"F{m}": sum(v == m for v in rewritten.values()) for m in sorted(set(rewritten.values()))}}
    else:
        data, ops = plain_xnnpack_lowering(spec.module, feeds), {}
    seconds = time.perf_counter() - t
    out.write_bytes(data)
    return {"which": which, "method": method_name(feeds) if which == "pocketdiff" else "forward",
            "lowering_s": round(seconds, 1), "ops": ops, "winograd": layers, "pte_bytes": len(data)}


def latency(model: str, component: str, batch: int, runs: int, winograd: str = "auto", per_block: int = 1) -> dict:
    """Median call latency of pocketdiff's lowering and of a plain XNNPACK lowering, same inputs, same run.
    Each lowering runs in its own process (at SD1.5 scale one lowering peaks near 15 GiB); this process
    then loads both programs from disk and times them in `runs` alternating blocks of one untimed and
    `per_block` timed calls each."""
    from executorch.runtime import Runtime

    from pocketdiff.export.components import example_inputs, wrap
    from pocketdiff.runtimes.profiler import compare_latency
    from pocketdiff.sources import load_model

    with tempfile.TemporaryDirectory(prefix="et-latency-") as tmp:  # removed also when a lowering fails
        work = Path(tmp)
        lowered = {}
        for which in ("pocketdiff", "plain"):
            cmd = [sys.executable, __file__, "lower", "--model", model, "--component", component, "--batch", str(batch),
                   "--which", which, "--out", str(work / f"{which}.pte"), "--winograd", winograd]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            last = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not last:
                raise SystemExit(f"{which} lowering failed (exit {proc.returncode}): {proc.stderr[-800:]}")
            lowered[which] = json.loads(last[-1])
        bundle = load_model(model)
        spec = wrap(bundle, component)
        feeds = example_inputs(bundle, component, batch)
        inputs = list(feeds.values())
        with torch.no_grad():
            ref = spec.module(**feeds)
        del bundle, spec
        rt = Runtime.get()
        methods = {w: rt.load_program(work / f"{w}.pte").load_method(lowered[w]["method"]) for w in lowered}
        err = {k: float((m.execute(inputs)[0] - ref).abs().max()) for k, m in methods.items()}
        stats = compare_latency({k: (lambda m=m: m.execute(inputs)) for k, m in methods.items()}, runs, per_block)
        lat = {k: st.median_s for k, st in stats.items()}
    return {"model": model, "component": component, "batch": batch, "shape": list(inputs[0].shape),
            "threads": torch.get_num_threads(), "blocks": runs, "timed_per_block": per_block,
            "plain_ms": round(lat["plain"] * 1e3, 2), "pocketdiff_ms": round(lat["pocketdiff"] * 1e3, 2),
            "speedup": round(lat["plain"] / lat["pocketdiff"], 3),
            "lowering_s": {w: lowered[w]["lowering_s"] for w in lowered}, "max_abs_vs_pytorch": err,
            "pte_bytes": {w: lowered[w]["pte_bytes"] for w in lowered}, "pocketdiff_winograd": lowered["pocketdiff"]["winograd"],
            "pocketdiff_delegates": lowered["pocketdiff"]["ops"]["delegates"],
            "pocketdiff_outside_delegates": lowered["pocketdiff"]["ops"]["outside_delegates"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scale")
    s.add_argument("--model", default="arch:sd15")
    s.add_argument("--targets", default="onnx,coreml,executorch")
    s.add_argument("--components", default="unet,vae_decoder")
    s.add_argument("--out", type=Path, default=None)
    s.add_argument("--timeout", type=float, default=1800, help="seconds before one export is killed")
    o = sub.add_parser("one")
    o.add_argument("--model", required=True)
    o.add_argument("--target", required=True)
    o.add_argument("--component", required=True)
    o.add_argument("--out", type=Path, required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--model", default="fashion")
    lat.add_argument("--component", default="unet")
    lat.add_argument("--batch", type=int, default=2)
    lat.add_argument("--runs", type=int, default=20, help="alternating blocks (one untimed call + --per-block timed)")
    lat.add_argument("--per-block", type=int, default=1)
    lat.add_argument("--winograd", choices=["auto", "off", "f2", "f4"], default="auto",
                     help="pocketdiff's Winograd layers (f2: smaller weights than auto's F4 where memory is short)")
    low = sub.add_parser("lower")
    low.add_argument("--model", required=True)
    low.add_argument("--component", required=True)
    low.add_argument("--batch", type=int, required=True)
    low.add_argument("--which", choices=["pocketdiff", "plain"], required=True)
    low.add_argument("--out", type=Path, required=True)
    low.add_argument("--winograd", choices=["auto", "off", "f2", "f4"], default="auto")
    args = p.parse_args()
    if args.cmd == "lower":
        print(json.dumps(lower_one(args.model, args.component, args.batch, args.which, args.out, args.winograd)))
    elif args.cmd == "one":
        print(json.dumps(export_one(args.model, args.target, args.component, args.out)))
    elif args.cmd == "scale":
        out = args.out or Path(tempfile.mkdtemp(prefix="export-scale-"))
        scale(args.model, args.targets.split(","), args.components.split(","), out, args.timeout)
    else:
        print(json.dumps(latency(args.model, args.component, args.batch, args.runs, args.winograd, args.per_block), indent=1))


if __name__ == "__main__":
    main()

"""Per-layer Winograd table: each 3x3 stride-1 conv shape of a model, direct vs F(2x2,3x3) vs F(4x4,3x3).

Times onnxruntime (CPU provider, default options) on one-Conv graphs, batch 1, fp32, the three
variants timed in --repeats alternating blocks of 3 calls (`runtimes.profiler.compare_latency`), median.
Writes the measurements to export/rewrites/winograd_table.py, which the ONNX exporter reads in "auto" mode (the
choice per row is `export.rewrites.winograd.pick_tile`), and prints a Markdown table for docs/BENCHMARKS.md,
losses included. `--from-table BACKEND` reprints a stored table with the current choice rule, no timing.

    flock /tmp/heavy.lock .venv/bin/python bench/winograd_bench.py fashion@64 arch:sd15@512 --repeats 5
    .venv/bin/python bench/winograd_bench.py --from-table onnx
"""

from __future__ import annotations

import argparse
import copy
import datetime
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pocketdiff.export.components import example_inputs, wrap
from pocketdiff.runtimes.profiler import compare_latency
from pocketdiff.export.rewrites.winograd import conv_input_sizes, conv_shape_key, pick_tile
from pocketdiff.export.rewrites.winograd_onnx import apply_winograd, single_conv_model
from pocketdiff.sources import load_model

TABLE_FILE = Path(__file__).resolve().parents[1] / "export" / "rewrites" / "winograd_table.py"


def layer_shapes(spec: str, components: list[str]) -> list[tuple[int, int, int, int, str]]:
    """Unique (cin, cout, h, w) of the model's 3x3 stride-1 pad-1 convs, with where they occur."""
    model, _, res = spec.partition("@")
    bundle = load_model(model, shapes_only=True)
    seen: dict[tuple[int, int, int, int], str] = {}
    for comp in components:
        sw = wrap(bundle, comp)
        feeds = example_inputs(bundle, comp, 1, int(res) if res else None)
        if model.startswith("arch:"):
            feeds = {k: v.to("meta") for k, v in feeds.items()}
        sizes = conv_input_sizes(sw.module, feeds)
        mods = dict(sw.module.named_modules())
        for path, (h, w) in sizes.items():
            conv = mods[path]
            if tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1) and conv.groups == 1:
                seen.setdefault((conv.in_channels, conv.out_channels, h, w), f"{model} {comp} {path}")
    return [(*k, v) for k, v in seen.items()]


def time_layer(cin: int, cout: int, h: int, w: int, repeats: int, per_block: int = 3) -> dict[str, float]:
    """Median ms of direct, F2 and F4 for one layer shape (`repeats` alternating blocks of `per_block` calls)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)
    bias = rng.standard_normal(cout)
    base = single_conv_model(cin, cout, weight, bias)
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    sessions = {}
    for name in ("direct", "f2", "f4"):
        model = copy.deepcopy(base)
        if name != "direct":
            apply_winograd(model, "onnx", name, {})
        sessions[name] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sessions["direct"].run(None, {"x": x})[0]
    for name, s in sessions.items():
        out = s.run(None, {"x": x})[0]
        assert np.abs(out - ref).max() < 1e-3 * max(1.0, np.abs(ref).max()), name
    stats = compare_latency({n: (lambda s=s: s.run(None, {"x": x})) for n, s in sessions.items()}, repeats, per_block)
    return {n: st.median_s * 1e3 for n, st in stats.items()}


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="MODEL@RESOLUTION, e.g. fashion@64 arch:sd15@512")
    p.add_argument("--from-table", choices=["onnx", "executorch"], default=None)
    p.add_argument("--components", default="unet,vae_decoder")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-pixels", type=int, default=128 * 128, help="skip layers with larger feature maps")
    args = p.parse_args()
    if args.from_table:
        from pocketdiff.export.rewrites.winograd_table import SOURCES, TABLE

        rows = [{"key": k, **v} for k, v in TABLE[args.from_table].items()]
        for row in rows:
            print(markdown_row(row))
        write_table(args.from_table, rows, SOURCES[args.from_table])
        return
    torch.set_grad_enabled(False)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    header = (f"{datetime.date.today().isoformat()}, {cpu}, {len(__import__('os').sched_getaffinity(0))} cores, "
              f"onnxruntime {ort.__version__}; command: {' '.join(sys.argv)}")
    rows = []
    for spec in args.models:
        for cin, cout, h, w, where in layer_shapes(spec, args.components.split(",")):
            if h * w > args.max_pixels:
                print(f"skipped {cin}x{cout}@{h}x{w} ({where}): feature map over --max-pixels", flush=True)
                continue
            t = time_layer(cin, cout, h, w, args.repeats)
            rows.append({"key": conv_shape_key(cin, cout, h, w), "where": where, **{f"{n}_ms": round(v, 3)
                         for n, v in t.items()}})
            print(markdown_row(rows[-1]), flush=True)
    write_table("onnx", rows, header)


def markdown_row(row: dict) -> str:
    """One BENCHMARKS.md table line: the times, the speedups and the tile `pick_tile` chooses."""
    d, f2, f4, m = row["direct_ms"], row["f2_ms"], row["f4_ms"], pick_tile(row)
    return (f"| {row['key']} | {row['where']} | {d:.2f} | {f2:.2f} ({d / f2:.2f}x) | {f4:.2f} ({d / f4:.2f}x) | "
            f"{'F' + str(m) if m else 'direct'} |")


def write_table(backend: str, rows: list[dict], header: str) -> None:
    """Replace `backend`'s rows (and how they were measured) in export/rewrites/winograd_table.py, keeping the others."""
    try:
        from pocketdiff.export.rewrites.winograd_table import SOURCES, TABLE
    except ImportError:
        SOURCES, TABLE = {}, {}
    keep = ("where", "direct_ms", "f2_ms", "f4_ms")
    tables = {**TABLE, backend: {r["key"]: {k: r[k] for k in keep} for r in rows}}
    sources = {**SOURCES, backend: header}
    TABLE_FILE.write_text(
        '"""Winograd per-layer tables (per backend), measured by bench/winograd_bench.py and\n'
        'bench/winograd_executorch.py; do not edit, rerun them. SOURCES says how each was measured;\n'
        'export.rewrites.winograd.pick_tile decides from these times."""\n\n'
        f"SOURCES: dict[str, str] = {sources!r}\n\nTABLE: dict[str, dict[str, dict]] = {tables!r}\n")
    print(f"wrote {TABLE_FILE}")


if __name__ == "__main__":
    main()

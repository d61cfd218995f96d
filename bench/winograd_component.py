"""Whole-component check of the Winograd table: pocketdiff's ONNX export with `--winograd auto` (or a forced
`--candidate f2/f4`) against `--winograd off`, same component, same inputs, same run (onnxruntime CPU,
default session options).

The table is measured on one-Conv graphs; in a whole network the rewritten layers also pay for their
extra kernels and colder caches, so this is what says whether the table's picks help a real call.

    flock /tmp/heavy.lock .venv/bin/python bench/winograd_component.py fashion --components unet,vae_decoder,vae_encoder
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pocketdiff.export.base import ExportOptions
from pocketdiff.export.components import example_inputs
from pocketdiff.export.onnx import OnnxExporter
from pocketdiff.runtimes.profiler import compare_latency, speedup
from pocketdiff.sources import load_model


def compare_component(spec: str, component: str, batch: int, blocks: int, per_block: int, work: Path,
                      candidate: str = "auto") -> dict:
    """Export `component` with Winograd off and `candidate`, then time both graphs in alternating blocks."""
    bundle = load_model(spec)
    feeds = {k: v.numpy() for k, v in example_inputs(bundle, component, batch).items()}
    sessions, arts = {}, {}
    for mode in ("off", candidate):
        opts = ExportOptions(components=(component,), batch_sizes=(batch,), extra={"winograd": mode})
        arts[mode] = OnnxExporter().export(bundle, component, opts, work / mode)
        sessions[mode] = ort.InferenceSession(str(work / mode / arts[mode].path), providers=["CPUExecutionProvider"])
    outs = {m: s.run(None, feeds)[0] for m, s in sessions.items()}
    stats = compare_latency({m: (lambda s=s: s.run(None, feeds)) for m, s in sessions.items()}, blocks, per_block)
    return {"model": spec, "component": component, "batch": batch,
            "candidate": candidate, "rewritten": len(arts[candidate].details["winograd"]["rewritten"]),
            "eligible": arts[candidate].details["winograd"]["eligible"],
            "median_ms": {m: round(st.median_s * 1e3, 3) for m, st in stats.items()},
            "speedup": round(speedup(stats, "off", candidate), 3),
            "bytes": {m: a.details["bytes"] for m, a in arts.items()},
            "max_abs_diff": float(np.abs(outs["off"] - outs[candidate]).max())}


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--components", default="unet,vae_decoder,vae_encoder")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--per-block", type=int, default=10)
    p.add_argument("--candidate", choices=["auto", "f2", "f4"], default="auto")
    args = p.parse_args()
    for component in args.components.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(compare_component(args.model, component, args.batch, args.blocks, args.per_block,
                                               Path(tmp), args.candidate)), flush=True)


if __name__ == "__main__":
    main()

"""Per-layer Winograd table on ExecuTorch CPU (XNNPACK delegate): direct conv vs F(2x2,3x3) vs F(4x4,3x3).

Each layer shape is lowered three times with ExecuTorch's stock XNNPACK partitioner (a Conv2d, and
`export.rewrites.winograd_torch.WinogradConv2d` with m=2 and m=4), run in ExecuTorch's Python runtime, batch 1,
fp32, timed in --repeats alternating blocks of 3 calls (`runtimes.profiler`), median. The rows go into
export/rewrites/winograd_table.py under "executorch"; a Markdown table is printed for docs/BENCHMARKS.md.

    flock /tmp/heavy.lock .venv/bin/python bench/winograd_executorch.py fashion@64 arch:sd15@512 --limit 8
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from winograd_bench import layer_shapes, markdown_row, write_table  # noqa: E402

from pocketdiff.export.executorch import plain_xnnpack_lowering  # noqa: E402
from pocketdiff.export.rewrites.winograd import conv_shape_key  # noqa: E402
from pocketdiff.export.rewrites.winograd_torch import WinogradConv2d  # noqa: E402
from pocketdiff.runtimes.profiler import compare_latency  # noqa: E402


class _Layer(torch.nn.Module):
    """One layer taking `x` by keyword, as the lowering helper feeds it."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def time_layer(cin: int, cout: int, h: int, w: int, repeats: int, tmp: Path) -> dict[str, float]:
    """Median ms of direct, F2 and F4 for one layer shape in the ExecuTorch runtime."""
    from executorch.runtime import Runtime

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1).eval()
    x = torch.randn(1, cin, h, w)
    variants = {"direct": conv, "f2": WinogradConv2d(conv, 2), "f4": WinogradConv2d(conv, 4)}
    methods = {}
    for name, mod in variants.items():
        path = tmp / f"{name}.pte"
        path.write_bytes(plain_xnnpack_lowering(_Layer(mod).eval(), {"x": x}))
        methods[name] = Runtime.get().load_program(path).load_method("forward")
    ref = conv(x).detach()
    for name, method in methods.items():
        out = method.execute([x])[0]
        assert (out - ref).abs().max() < 1e-3 * max(1.0, float(ref.abs().max())), name
    stats = compare_latency({n: (lambda m=m: m.execute([x])) for n, m in methods.items()}, repeats, 3)
    return {n: st.median_s * 1e3 for n, st in stats.items()}


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="MODEL@RESOLUTION")
    p.add_argument("--components", default="unet")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--limit", type=int, default=0, help="at most this many layer shapes per model (0: all)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    from importlib.metadata import version

    header = (f"{datetime.date.today().isoformat()}, {cpu}, {len(os.sched_getaffinity(0))} cores, executorch "
              f"{version('executorch')} (XNNPACK); command: {' '.join(sys.argv)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            shapes = [s for s in layer_shapes(spec, args.components.split(",")) if s[0] >= 8 and s[1] >= 8]
            for cin, cout, h, w, where in shapes[: args.limit or None]:
                t = time_layer(cin, cout, h, w, args.repeats, Path(tmp))
                rows.append({"key": conv_shape_key(cin, cout, h, w), "where": where,
                             **{f"{n}_ms": round(v, 3) for n, v in t.items()}})
                print(markdown_row(rows[-1]), flush=True)
    write_table("executorch", rows, header)


if __name__ == "__main__":
    main()

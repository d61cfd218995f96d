"""Winograd F(2x2,3x3) and F(4x4,3x3) for 3x3 stride-1 convolutions: the transforms and the per-layer choice.

The two rewrites share this: the ONNX graph rewrite (`winograd_onnx.apply_winograd`, for onnxruntime) and
the torch module swap (`winograd_torch.swap_winograd_modules`, for ExecuTorch / XNNPACK). With m = 2 or 4
outputs per tile side and a = m + 2, the multiplies of the main product drop from 9 per output to
a^2/m^2 (4 for F2, 2.25 for F4). Whether that is faster than the runtime's own convolution depends on the
layer's shape, so in "auto" mode only the layers the measured table (`winograd_table.py`, written by
bench/winograd_bench.py and bench/winograd_executorch.py) says win on that backend are rewritten; "f2" /
"f4" force a tile everywhere, "off" never rewrites.
"""

from __future__ import annotations

from fractions import Fraction as Fr
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError
from . import winograd_table

MODES = ("auto", "off", "f2", "f4")  # f2/f4: every eligible layer with that tile

# Lavin & Gray (2016) transforms, exact rationals.
_BT = {2: [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
       4: [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
           [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]}
_G = {2: [[1, 0, 0], [Fr(1, 2), Fr(1, 2), Fr(1, 2)], [Fr(1, 2), Fr(-1, 2), Fr(1, 2)], [0, 0, 1]],
      4: [[Fr(1, 4), 0, 0], [Fr(-1, 6), Fr(-1, 6), Fr(-1, 6)], [Fr(-1, 6), Fr(1, 6), Fr(-1, 6)],
          [Fr(1, 24), Fr(1, 12), Fr(1, 6)], [Fr(1, 24), Fr(-1, 12), Fr(1, 6)], [0, 0, 1]]}
_AT = {2: [[1, 1, 1, 0], [0, 1, -1, -1]],
       4: [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]}


def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) of F(m x m, 3 x 3) as float64."""
    if m not in _BT:
        raise ConfigError(f"Winograd F({m}x{m},3x3) is not implemented; use m=2 or m=4")
    return (np.array(_BT[m], dtype=np.float64), np.array([[float(v) for v in r] for r in _G[m]]),
            np.array(_AT[m], dtype=np.float64))


def transform_weights(w: np.ndarray, m: int) -> np.ndarray:
    """[K, C, 3, 3] weights -> [a^2, K, C] (G g G^T per filter), computed in float64."""
    _, g, _ = matrices(m)
    u = np.einsum("xi,kcij,yj->xykc", g, w.astype(np.float64), g)
    a = m + 2
    return u.reshape(a * a, *w.shape[:2])


def input_transform_kernel(m: int) -> np.ndarray:
    """[a^2, 1, a, a] depthwise kernel whose output (xi, nu) is (B^T d B)[xi, nu] of each tile d."""
    bt, _, _ = matrices(m)
    a = m + 2
    return np.einsum("xi,yj->xyij", bt, bt).reshape(a * a, 1, a, a)


def output_transform(m: int) -> np.ndarray:
    """[m^2, a^2] matrix taking the a x a product tile to the m x m output tile (A^T M A)."""
    _, _, at = matrices(m)
    return np.einsum("rx,sy->rsxy", at, at).reshape(m * m, (m + 2) ** 2)


def conv_shape_key(cin: int, cout: int, h: int, w: int) -> str:
    """Table key of one convolution layer shape."""
    return f"{cin}x{cout}@{h}x{w}"


def choose_m(backend: str, cin: int, cout: int, h: int, w: int, mode: str) -> int | None:
    """Tile size to use for one layer: from the measured table in "auto", fixed in "f2"/"f4", none in "off"."""
    if mode not in MODES:
        raise ConfigError(f"unknown Winograd mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "off":
        return None
    if mode in ("f2", "f4"):
        return int(mode[1])
    row = winograd_table.TABLE.get(backend, {}).get(conv_shape_key(cin, cout, h, w))
    return None if row is None else pick_tile(row)


# A tile is used where, on its own, it is at least 5 % faster and saves at least 1 ms per call: inside a
# network each rewritten layer also pays for about fifteen more kernels and colder caches. Measured on this
# kind of host (2026-11-26): the built-in VAE decoder with 12 layers rewritten that each saved 0.1-0.9 ms ran
# 0.84x as fast as with none, while SD1.5's 8x8 layers (3.5-7 ms saved each, only 1.15-1.31x) took the whole
# U-Net from 1.30x to 1.42-1.48x against the plain export (docs/BENCHMARKS.md).
MIN_LAYER_SPEEDUP = 1.05
MIN_SAVED_MS = 1.0


def pick_tile(row: dict[str, float]) -> int | None:
    """The tile size (2 or 4) one measured table row ({"direct_ms", "f2_ms", "f4_ms"}) calls for, or None."""
    best = min((2, 4), key=lambda m: row[f"f{m}_ms"])
    direct, tiled = row["direct_ms"], row[f"f{best}_ms"]
    return best if direct >= MIN_LAYER_SPEEDUP * tiled and direct - tiled >= MIN_SAVED_MS else None


def conv_input_sizes(module: Any, feeds: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Module path -> input (height, width) of every 3x3 Conv2d, from one forward pass over `feeds`."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [sub.register_forward_pre_hook(lambda m, a, p=path: _record(sizes, p, a[0]))
             for path, sub in module.named_modules()
             if isinstance(sub, torch.nn.Conv2d) and tuple(sub.kernel_size) == (3, 3)]
    try:
        with torch.no_grad():
            module(**feeds)
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _record(sizes: dict[str, tuple[int, int]], path: str, x: Any) -> None:
    """Pre-hook body: remember the first input size a module saw (returns None: inputs unchanged)."""
    sizes.setdefault(path, (int(x.shape[-2]), int(x.shape[-1])))


def effective_mode(mode: str, fp32: bool) -> str:
    """The mode to apply: the tables were measured in fp32, so "auto" leaves fp16 graphs direct."""
    return "off" if mode == "auto" and not fp32 else mode

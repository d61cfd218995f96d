"""Winograd F(2x2,3x3) and F(4x4,3x3) for 3x3 stride-1 convolutions, as an ONNX graph rewrite and as a
torch module swap (`swap_winograd_modules`, for the ExecuTorch lowering).

A Conv (3x3, stride 1, dilation 1, pad 1, one group, weights as an initializer) becomes standard ops:
    Pad each channel plane to whole tiles (sizes computed in the graph, so dynamic height/width still
    work) and stack the planes into one tall image
    -> input transform B^T d B: one Conv (a x a kernel, stride m, a^2 outputs), already in the
       [a^2, N, C, tiles] layout of the next step once a Slice drops each plane's straddling tile row
    -> batched MatMul with the weights G g G^T (transformed at export time, in float64)
    -> output transform A^T M A and tile interleave: one stride-m ConvTranspose
    -> Slice off the padding, add the bias.
(m = 2 or 4 outputs per tile side; a = m + 2.) The multiplies of the main product drop from 9 per
output to a^2/m^2 (4 for F2, 2.25 for F4). Whether that is faster than the runtime's own convolution
depends on the layer's shape, so `apply_winograd` rewrites only the layers the measured table
(`winograd_table.py`, written by bench/winograd_bench.py) says win on that backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction as Fr
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..errors import ConfigError

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


def eligible(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A 3x3, stride-1, dilation-1, pad-1, single-group Conv with constant weights."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w = inits[node.input[1]]
    return (list(w.dims[2:]) == [3, 3] and list(attrs.get("strides", [1, 1])) == [1, 1]
            and list(attrs.get("dilations", [1, 1])) == [1, 1] and attrs.get("group", 1) == 1
            and list(attrs.get("pads", [0, 0, 0, 0])) == [1, 1, 1, 1]
            and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))


@dataclass
class _Builder:
    """Adds nodes and initializers for one rewritten Conv, with unique names under `prefix`."""

    graph: onnx.GraphProto
    prefix: str
    nodes: list[onnx.NodeProto]

    def const(self, name: str, value: np.ndarray) -> str:
        """Add an initializer; returns its name."""
        full = f"{self.prefix}/{name}"
        self.graph.initializer.append(numpy_helper.from_array(value, full))
        return full

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        """Add a one-output node; returns its output name."""
        out = f"{self.prefix}/{name}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def rewrite_conv(graph: onnx.GraphProto, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None,
                 m: int) -> list[onnx.NodeProto]:
    """The nodes computing `node`'s Conv in Winograd F(m x m, 3 x 3) form (same input and output names).

    Every channel plane is padded to m*(th+1) rows (th = ceil(H/m) tile rows) so the planes of all
    images stack into one tall one-channel image whose a x a tiles at stride m start on a plane's rows
    (one extra tile row per plane straddles two planes and is sliced off). That lets the input transform
    write the [a^2, N, C, T] layout the main product reads, and the output transform (a stride-m
    ConvTranspose) read the product's [a^2, N*K, ...] layout directly: no Transpose or DepthToSpace passes
    over the a^2/m^2-times-larger Winograd-domain tensors.
    """
    dtype = weight.dtype
    k, c = weight.shape[:2]
    a = m + 2
    b = _Builder(graph, f"{node.name or node.output[0]}/winograd{m}", [])
    x = node.input[0]
    i64 = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
    shape = b.op("Shape", [x], "shape")
    batch = b.op("Gather", [shape, b.const("n_idx", i64([0]))], "n", axis=0)
    hw = b.op("Gather", [shape, b.const("hw_idx", i64([2, 3]))], "hw", axis=0)
    mm = b.const("m", i64([m, m]))
    tiles = b.op("Div", [b.op("Add", [hw, b.const("m_minus_1", i64([m - 1, m - 1]))], "hw_up"), mm], "tiles")
    # Plane size: m*(th+1) rows, m*tw+2 columns; one zero row/column in front, the rest behind.
    padded = b.op("Add", [b.op("Mul", [tiles, mm], "tiles_m"), b.const("grow", i64([m, 2]))], "padded_hw")
    end_pad = b.op("Sub", [b.op("Sub", [padded, hw], "added"), b.const("one", i64([1, 1]))], "end_pad")
    pads = b.op("Concat", [b.const("pad_head", i64([0, 0, 1, 1])), b.const("zero2", i64([0, 0])), end_pad],
                "pads", axis=0)
    tall = b.op("Reshape", [b.op("Pad", [x, pads], "pad", mode="constant"),
                            b.const("tall_shape", i64([1, 1, -1, 0]))], "tall")  # [1, 1, N*C*rows, cols]
    # Input transform B^T d B: one a x a, stride-m Conv with a^2 outputs; m zero rows below the last plane
    # give every plane th+1 tile rows.
    v = b.op("Conv", [tall, b.const("bt_kernel", input_transform_kernel(m).astype(dtype))], "input_transform",
             kernel_shape=[a, a], strides=[m, m], pads=[0, 0, m, 0])  # [1, a^2, N*C*(th+1), tw]
    th = b.op("Gather", [tiles, b.const("h_idx", i64([0]))], "th", axis=0)
    tw = b.op("Gather", [tiles, b.const("w_idx", i64([1]))], "tw", axis=0)
    planes = b.op("Reshape", [v, b.op("Concat", [b.const("a2_planes", i64([a * a, -1])), b.op(
        "Add", [th, b.const("one_row", i64([1]))], "rows"), tw], "planes_shape", axis=0)], "planes")
    # Drop each plane's straddling tile row (a copy, but the product then does no wasted work: at 16x16
    # the extra row would be a fifth of it).
    whole = b.op("Slice", [planes, b.const("zero", i64([0])), th, b.const("row_axis", i64([2]))], "whole_tiles")
    v_shape = b.op("Concat", [b.const("a2", i64([a * a])), batch, b.const("c_t", i64([c, -1]))], "v_shape", axis=0)
    u = b.const("weights", transform_weights(weight, m).astype(dtype).reshape(a * a, 1, k, c))
    prod = b.op("MatMul", [u, b.op("Reshape", [whole, v_shape], "v")], "product")  # [a^2, N, K, th*tw]
    img = b.op("Reshape", [prod, b.op("Concat", [b.const("img_head", i64([1, a * a, -1])), tw], "img_shape", axis=0)],
               "product_image")  # [1, a^2, N*K*th, tw]
    # Output transform A^T M A and the tile interleave in one stride-m ConvTranspose (a^2 channels -> 1).
    at = output_transform(m).reshape(m, m, a * a).transpose(2, 0, 1).reshape(a * a, 1, m, m)
    y = b.op("ConvTranspose", [img, b.const("at_kernel", at.astype(dtype))], "output_transform",
             kernel_shape=[m, m], strides=[m, m])  # [1, 1, N*K*th*m, tw*m]
    y_shape = b.op("Concat", [batch, b.const("k_rest", i64([k, -1])), b.op("Mul", [tw, b.const("m1", i64([m]))], "w_m")],
                   "y_shape", axis=0)
    y4 = b.op("Reshape", [y, y_shape], "y")  # [N, K, th*m, tw*m]
    cropped = b.op("Slice", [y4, b.const("starts", i64([0, 0])), hw, b.const("axes", i64([2, 3]))], "crop")
    final = node.output[0]
    if bias is not None:
        b.nodes.append(helper.make_node("Add", [cropped, b.const("bias", bias.reshape(1, k, 1, 1).astype(dtype))],
                                        [final], name=f"{b.prefix}/bias"))
    else:
        b.nodes.append(helper.make_node("Identity", [cropped], [final], name=f"{b.prefix}/out"))
    return b.nodes


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
    from .winograd_table import TABLE

    row = TABLE.get(backend, {}).get(conv_shape_key(cin, cout, h, w))
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


def node_scope(name: str) -> str:
    """Module path of a TorchScript-exported node name: "/unet/conv_in/Conv" -> "unet.conv_in"."""
    return ".".join(name.strip("/").split("/")[:-1])


def scope_index(paths: Any) -> dict[str, str]:
    """Node scope -> module path, also by suffix: a wrapper that calls `vae.decode` (not `vae(...)`)
    yields node scopes without the "vae." prefix."""
    index: dict[str, str] = {}
    ambiguous: set[str] = set()
    for path in paths:
        parts = path.split(".")
        for i in range(1, len(parts)):
            suffix = ".".join(parts[i:])
            if suffix in index and index[suffix] != path:
                ambiguous.add(suffix)
            index.setdefault(suffix, path)
    for suffix in ambiguous:
        index.pop(suffix, None)
    return {**index, **{p: p for p in paths}}


def apply_winograd(model: onnx.ModelProto, backend: str, mode: str, spatial: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Rewrite eligible Convs of `model` in place; returns {"mode", "rewritten": {node: m}, "eligible": n}.

    `spatial` maps module paths (see `conv_input_sizes`) to the input height and width at the first
    exported shape, as the table is keyed by layer shape; a Conv not in it is left alone in "auto".
    """
    if mode == "off":
        return {"mode": mode, "rewritten": {}, "eligible": 0}
    scopes = scope_index(spatial)
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    new_nodes: list[onnx.NodeProto] = []
    rewritten: dict[str, int] = {}
    n_eligible = 0
    for node in list(model.graph.node):
        if not eligible(node, inits):
            new_nodes.append(node)
            continue
        n_eligible += 1
        w = numpy_helper.to_array(inits[node.input[1]])
        h, wd = spatial.get(scopes.get(node_scope(node.name), ""), (0, 0))
        m = choose_m(backend, w.shape[1], w.shape[0], h, wd, mode) if (h or mode != "auto") else None
        if m is None:
            new_nodes.append(node)
            continue
        bias = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        new_nodes.extend(rewrite_conv(model.graph, node, w, bias, m))
        rewritten[node.name] = m
        for name in node.input[1:]:
            consumers[name] -= 1
            if consumers[name] == 0 and name in inits:  # free the 3x3 weights now: SD-size graphs are GBs
                model.graph.initializer.remove(inits.pop(name))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return {"mode": mode, "rewritten": rewritten, "eligible": n_eligible}


def single_conv_model(cin: int, cout: int, weight: np.ndarray, bias: np.ndarray | None,
                      dtype: Any = np.float32) -> onnx.ModelProto:
    """A one-Conv ONNX model (dynamic N, H, W) for the per-layer tests and the benchmark."""
    et = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(weight.astype(dtype), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(dtype), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="/conv/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                            strides=[1, 1])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", et, ["N", cin, "H", "W"])],
                              [helper.make_tensor_value_info("y", et, ["N", cout, "H", "W"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])



class WinogradConv2d(torch.nn.Module):
    """A 3x3 stride-1 pad-1 Conv2d computed in Winograd form, in torch ops (torch.export-able).

    The same algorithm as the ONNX rewrite, in aten ops an ExecuTorch/XNNPACK lowering understands:
    conv2d (input transform), permute, bmm (main product), matmul (output transform), pixel_shuffle.
    It keeps the permute layout rather than the ONNX rewrite's tall-image one: lowered through XNNPACK,
    the tall form (conv2d, matmul, conv_transpose2d) took 81.8 ms against this form's 38.0 ms on a
    320x320@64x64 F4 layer (this 2-core host, 2026-11-26).
    """

    def __init__(self, conv: torch.nn.Conv2d, m: int):
        super().__init__()
        w = conv.weight.detach().double().numpy()
        self.m, self.k = m, w.shape[0]
        dtype = conv.weight.dtype
        self.register_buffer("u", torch.from_numpy(transform_weights(w, m)).to(dtype))
        self.register_buffer("bt", torch.from_numpy(input_transform_kernel(m)).to(dtype))
        self.register_buffer("at", torch.from_numpy(output_transform(m)).to(dtype))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        m, a, k = self.m, self.m + 2, self.k
        th, tw = (h + m - 1) // m, (w + m - 1) // m
        xp = torch.nn.functional.pad(x, (1, tw * m - w + 1, 1, th * m - h + 1))
        v = torch.nn.functional.conv2d(xp.reshape(n * c, 1, th * m + 2, tw * m + 2), self.bt, stride=m)
        v = v.reshape(n, c, a * a, th * tw).permute(2, 1, 0, 3).reshape(a * a, c, n * th * tw)
        prod = torch.bmm(self.u, v)  # [a^2, K, N*T]
        y = torch.matmul(self.at, prod.reshape(a * a, k * n * th * tw))  # [m^2, K*N*T]
        # -> [N, K*m*m, th, tw] with channel k*m*m + r*m + s: pixel_shuffle's order.
        y = y.reshape(m * m, k, n, th * tw).permute(2, 1, 0, 3).reshape(n, k * m * m, th, tw)
        y = torch.nn.functional.pixel_shuffle(y, m)[:, :, :h, :w]
        return y if self.bias is None else y + self.bias.view(1, k, 1, 1)


def eligible_module(sub: torch.nn.Module) -> bool:
    """A 3x3, stride-1, dilation-1, zero-pad-1, single-group Conv2d (the module twin of `eligible`)."""
    return (isinstance(sub, torch.nn.Conv2d) and tuple(sub.kernel_size) == (3, 3) and tuple(sub.stride) == (1, 1)
            and tuple(sub.dilation) == (1, 1) and sub.groups == 1 and tuple(sub.padding) == (1, 1)
            and sub.padding_mode == "zeros")


def effective_mode(mode: str, fp32: bool) -> str:
    """The mode to apply: the tables were measured in fp32, so "auto" leaves fp16 graphs direct."""
    return "off" if mode == "auto" and not fp32 else mode


def swap_winograd_modules(module: torch.nn.Module, backend: str, mode: str,
                          spatial: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Replace, in place, every 3x3 stride-1 pad-1 Conv2d of `module` that the table for `backend` (or a
    forced mode) picks with a `WinogradConv2d`; `spatial` as for `apply_winograd`. Returns
    {"mode", "rewritten": {module path: m}, "eligible": n}."""
    if mode == "off":
        return {"mode": mode, "rewritten": {}, "eligible": 0}
    rewritten: dict[str, int] = {}
    n_eligible = 0
    for path, sub in list(module.named_modules()):
        if not eligible_module(sub):
            continue
        n_eligible += 1
        h, w = spatial.get(path, (0, 0))
        m = choose_m(backend, sub.in_channels, sub.out_channels, h, w, mode) if (h or mode != "auto") else None
        if m is None:
            continue
        parent_path, _, name = path.rpartition(".")
        setattr(module.get_submodule(parent_path) if parent_path else module, name, WinogradConv2d(sub, m))
        rewritten[path] = m
    return {"mode": mode, "rewritten": rewritten, "eligible": n_eligible}

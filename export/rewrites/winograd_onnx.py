"""Winograd F(2x2,3x3) / F(4x4,3x3) as an ONNX graph rewrite, for onnxruntime (the ONNX exporter applies it).

A Conv (3x3, stride 1, dilation 1, pad 1, one group, weights as an initializer) becomes standard ops:
    Pad each channel plane to whole tiles (sizes computed in the graph, so dynamic height/width still
    work) and stack the planes into one tall image
    -> input transform B^T d B: one Conv (a x a kernel, stride m, a^2 outputs), already in the
       [a^2, N, C, tiles] layout of the next step once a Slice drops each plane's straddling tile row
    -> batched MatMul with the weights G g G^T (transformed at export time, in float64)
    -> output transform A^T M A and tile interleave: one stride-m ConvTranspose
    -> Slice off the padding, add the bias.
The transforms and the per-layer choice (`choose_m`, from the measured table) are in `winograd.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .winograd import choose_m, input_transform_kernel, output_transform, transform_weights


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


def apply_winograd(model: onnx.ModelProto, backend: str, mode: str, spatial: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Rewrite eligible Convs of `model` in place; returns {"mode", "rewritten": {node: m}, "eligible": n}.

    `spatial` maps Conv node names to their input height and width at the first exported shape, as the
    table is keyed by layer shape; a Conv not in it is left alone in "auto".
    """
    if mode == "off":
        return {"mode": mode, "rewritten": {}, "eligible": 0}
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
        h, wd = spatial.get(node.name, (0, 0))
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

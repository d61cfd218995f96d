"""Winograd F(2x2,3x3) / F(4x4,3x3): exact in rational arithmetic, within rounding per layer, used per the table."""

import copy
import random
from fractions import Fraction

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pocketdiff.export.base import ExportOptions
from pocketdiff.export.components import example_inputs, wrap
from pocketdiff.export.onnx import OnnxExporter
from pocketdiff.export.rewrites.winograd import (choose_m, conv_shape_key, input_transform_kernel, matrices,
                                                 output_transform, pick_tile, transform_weights)
from pocketdiff.export.rewrites.winograd_onnx import apply_winograd, single_conv_model
from pocketdiff.runtimes.base import open_session
from pocketdiff.zoo import build_arch

EPS = {np.float32: np.finfo(np.float32).eps, np.float16: np.finfo(np.float16).eps}


@pytest.mark.parametrize("m", [2, 4])
def test_transforms_are_exact_in_rational_arithmetic(m):
    """A^T [(G g G^T) * (B^T d B)] A equals the 3x3 correlation exactly, for random integer tiles."""
    from pocketdiff.export.rewrites.winograd import _AT, _BT, _G

    rng = random.Random(m)
    a = m + 2
    bt = [[Fraction(v) for v in r] for r in _BT[m]]
    g = [[Fraction(v) for v in r] for r in _G[m]]
    at = [[Fraction(v) for v in r] for r in _AT[m]]

    def mul(x, y):
        return [[sum(x[i][k] * y[k][j] for k in range(len(y))) for j in range(len(y[0]))] for i in range(len(x))]

    def t(x):
        return [list(r) for r in zip(*x)]

    for _ in range(3):
        d = [[Fraction(rng.randint(-9, 9)) for _ in range(a)] for _ in range(a)]
        w = [[Fraction(rng.randint(-9, 9)) for _ in range(3)] for _ in range(3)]
        u, v = mul(mul(g, w), t(g)), mul(mul(bt, d), t(bt))
        y = mul(mul(at, [[u[i][j] * v[i][j] for j in range(a)] for i in range(a)]), t(at))
        direct = [[sum(d[r + i][s + j] * w[i][j] for i in range(3) for j in range(3)) for s in range(m)]
                  for r in range(m)]
        assert y == direct


def test_matrix_helpers_agree_with_definitions():
    bt, g, at = matrices(4)
    assert input_transform_kernel(4).shape == (36, 1, 6, 6) and output_transform(4).shape == (16, 36)
    w = np.random.default_rng(0).standard_normal((5, 3, 3, 3))
    u = transform_weights(w, 4).reshape(6, 6, 5, 3)
    assert np.allclose(u[..., 1, 2], g @ w[1, 2] @ g.T)


def _conv64(x, w, b):
    return torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                      None if b is None else torch.from_numpy(b).double(), padding=1).numpy()


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(2, 8, 16, 12, 12, True), (1, 32, 24, 7, 9, False), (1, 64, 64, 16, 16, True)])
def test_per_layer_error_is_rounding_only(dtype, m, shape):
    """|winograd - exact| stays within a rounding bound scaled by the layer's |x| * |w| magnitude."""
    n, cin, cout, h, w_, with_bias = shape
    rng = np.random.default_rng(cin + m)
    w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if with_bias else None
    x = rng.standard_normal((n, cin, h, w_)).astype(dtype)
    base = single_conv_model(cin, cout, w, b, dtype)
    wino = copy.deepcopy(base)
    info = apply_winograd(wino, "onnx", f"f{m}", {})
    assert info["rewritten"] == {"/conv/Conv": m}
    exact = _conv64(x.astype(np.float64), w.astype(np.float64), None if b is None else b.astype(np.float64))
    magnitude = _conv64(np.abs(x).astype(np.float64), np.abs(w).astype(np.float64), None) + (
        0 if b is None else np.abs(b.astype(np.float64))[None, :, None, None])
    got = _run(wino, x).astype(np.float64)
    assert got.shape == exact.shape
    # F(2,3) transforms have entries <= 1, F(4,3) up to 8 (A) and 5 (B): the bound grows with them.
    factor = {2: 8, 4: 64}[m] * EPS[dtype]
    assert (np.abs(got - exact) <= factor * magnitude + 1e-30).all()


def test_a_tile_must_win_clearly_on_its_own():
    assert pick_tile({"direct_ms": 4.0, "f2_ms": 3.1, "f4_ms": 3.0}) == 4
    assert pick_tile({"direct_ms": 4.0, "f2_ms": 2.9, "f4_ms": 3.0}) == 2
    assert pick_tile({"direct_ms": 3.9, "f2_ms": 3.8, "f4_ms": 3.0}) is None  # saves under 1 ms
    assert pick_tile({"direct_ms": 40.0, "f2_ms": 39.0, "f4_ms": 38.5}) is None  # under 5 % faster
    assert pick_tile({"direct_ms": 30.0, "f2_ms": 26.0, "f4_ms": 27.0}) == 2


def test_only_eligible_convs_are_rewritten():
    rng = np.random.default_rng(0)
    model = single_conv_model(4, 4, rng.standard_normal((4, 4, 3, 3)), None)
    model.graph.node[0].attribute.append(__import__("onnx").helper.make_attribute("group", 2))
    assert apply_winograd(copy.deepcopy(model), "onnx", "f4", {})["rewritten"] == {}
    assert choose_m("onnx", 4, 4, 8, 8, "off") is None and choose_m("onnx", 4, 4, 8, 8, "f2") == 2


@pytest.mark.parametrize("m", [2, 4])
def test_rewrite_is_one_conv_one_product_one_conv_transpose_and_serves_every_shape(m):
    """The tall-image form: no Transpose/DepthToSpace passes, and one graph right at any batch and size."""
    rng = np.random.default_rng(m)
    w, b = rng.standard_normal((6, 5, 3, 3)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    model = single_conv_model(5, 6, w, b)
    apply_winograd(model, "onnx", f"f{m}", {})
    ops = [n.op_type for n in model.graph.node]
    assert (ops.count("Conv"), ops.count("MatMul"), ops.count("ConvTranspose")) == (1, 1, 1)
    assert "Transpose" not in ops and "DepthToSpace" not in ops
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for n, h, w_ in [(1, 8, 8), (2, 7, 9), (3, 1, 13), (2, 16, 5)]:
        x = rng.standard_normal((n, 5, h, w_)).astype(np.float32)
        exact = _conv64(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
        got = sess.run(None, {"x": x})[0]
        assert got.shape == exact.shape and np.abs(got - exact).max() < 1e-4


def test_exported_unet_with_winograd_matches_pytorch(tmp_path):
    bundle = build_arch("tiny", seed=2)
    art = OnnxExporter().export(bundle, "unet", ExportOptions(components=("unet",), batch_sizes=(2,),
                                                             extra={"winograd": "f4"}), tmp_path)
    wino = art.details["winograd"]
    assert wino["eligible"] > 0 and len(wino["rewritten"]) == wino["eligible"]
    sess = open_session(art, tmp_path)
    feeds = example_inputs(bundle, "unet", 2, 24)
    with torch.no_grad():
        ref = wrap(bundle, "unet").module(**feeds).numpy()
    out = sess.run({k: v.numpy() for k, v in feeds.items()})["out_sample"]
    assert np.abs(out - ref).max() < 1e-4


def test_auto_mode_follows_the_measured_table(tmp_path, monkeypatch):
    """Exactly the convs whose table row calls for a tile are rewritten, with that tile; fp16 stays direct."""
    from pocketdiff.export.onnx import node_scope
    from pocketdiff.export.rewrites import winograd_table
    from pocketdiff.export.rewrites.winograd import conv_input_sizes
    from pocketdiff.export.rewrites.winograd_torch import eligible_module

    bundle = build_arch("tiny", seed=2)
    module = wrap(bundle, "unet").module
    sizes = conv_input_sizes(module, example_inputs(bundle, "unet"))
    keys = {path: conv_shape_key(conv.in_channels, conv.out_channels, *sizes[path])
            for path, conv in module.named_modules() if eligible_module(conv)}
    first, second = sorted(set(keys.values()))[:2]  # one shape that wins with F4; one 25 % faster but under 1 ms saved
    table = {**winograd_table.TABLE, "onnx": {
        first: {"where": "test", "direct_ms": 4.0, "f2_ms": 3.5, "f4_ms": 2.0},
        second: {"where": "test", "direct_ms": 4.0, "f2_ms": 3.5, "f4_ms": 3.2}}}
    monkeypatch.setattr(winograd_table, "TABLE", table)
    art = OnnxExporter().export(bundle, "unet", ExportOptions(components=("unet",)), tmp_path)
    rewritten = {node_scope(node): m for node, m in art.details["winograd"]["rewritten"].items()}
    assert rewritten == {path: 4 for path, key in keys.items() if key == first}
    fp16 = OnnxExporter().export(bundle, "unet", ExportOptions(components=("unet",), precision="fp16"),
                                 tmp_path / "h")
    assert fp16.details["winograd"]["rewritten"] == {}


@pytest.mark.parametrize("m", [2, 4])
def test_torch_winograd_module_matches_conv_and_exports(m):
    from pocketdiff.export.rewrites.winograd_torch import WinogradConv2d

    torch.manual_seed(m)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(2, 16, 13, 10)
    wino = WinogradConv2d(conv, m)
    with torch.no_grad():
        exact = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        magnitude = torch.nn.functional.conv2d(x.double().abs(), conv.weight.double().abs(), padding=1)
        got = wino(x).double()
    assert (got - exact).abs().le({2: 8, 4: 64}[m] * EPS[np.float32] * (magnitude + conv.bias.double().abs()
                                                                          .view(1, -1, 1, 1))).all()
    ep = torch.export.export(wino, (x,))
    assert any("bmm" in str(n.target) for n in ep.graph.nodes)

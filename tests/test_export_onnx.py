"""ONNX export: layout, dynamic shapes, fused-attention counts, fp16 islands, bad input, atomic writes."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from test_bad_input_cli import run_cli  # noqa: F401  (a fixture)

from pocketdiff.errors import ConfigError, GateError, ShapeError, UnsupportedOpError, UserError
from pocketdiff.export.base import ArtifactSet, ExportOptions, export_bundle
from pocketdiff.export.components import example_inputs, locate_op, wrap
from pocketdiff.export.onnx import OnnxExporter, count_onnx_fused, fp16_trouble
from pocketdiff.export.rewrites.attention import FORMS, attention_form, attention_modules
from pocketdiff.export.rewrites.feedforward import split_geglu
from pocketdiff.runtimes.base import open_session
from pocketdiff.zoo import build_arch

ALL = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


@pytest.fixture(scope="module")
def fp32_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("x") / "art"
    export_bundle(tiny, "arch:tiny", ["onnx"], ExportOptions(components=ALL, resolutions=(16, 24)), out)
    return out


def test_layout_and_manifest(fp32_dir):
    for comp in ALL:
        assert (fp32_dir / "onnx" / comp / "model.onnx").is_file()
        assert json.loads((fp32_dir / "onnx" / comp / "config.json").read_text())
    assert (fp32_dir / "onnx" / "tokenizer").is_dir() and (fp32_dir / "onnx" / "scheduler").is_dir()
    index = json.loads((fp32_dir / "onnx" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "OnnxRuntimeModel"]
    aset = ArtifactSet.load(fp32_dir)
    unet = aset.find("onnx", "unet")
    assert unet.inputs["sample"]["shape"] == ["batch", 4, "height", "width"]
    assert unet.inputs["timestep"]["dtype"] == "float32"
    assert len(unet.shapes) == 4  # batch 1, 2 x resolution 16, 24
    assert aset.sampler["scaling_factor"] == pytest.approx(0.18215)
    assert not list(fp32_dir.parent.glob(".art.tmp-*"))


def test_fused_attention_count_is_intended(tiny, fp32_dir):
    aset = ArtifactSet.load(fp32_dir)
    n_unet = len(attention_modules(tiny.unet))
    assert n_unet == 8
    assert count_onnx_fused(fp32_dir / aset.find("onnx", "unet").path) == n_unet
    assert count_onnx_fused(fp32_dir / aset.find("onnx", "vae_decoder").path) == 1  # decoder mid-block only
    for a in aset.artifacts:
        assert a.details["fused_attention"] == a.details["fused_attention_intended"]
    model = onnx.load(str(fp32_dir / aset.find("onnx", "unet").path))
    assert not [n for n in model.graph.node if n.op_type == "Softmax"]  # no unfused attention left


def test_geglu_is_traced_as_two_projections(tiny, fp32_dir):
    spec = wrap(tiny, "unet")
    feeds = example_inputs(tiny, "unet", 2)
    geglu = tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[0]
    with torch.no_grad():
        ref = spec.module(**feeds)
        with split_geglu(spec.module) as n:
            assert "forward" in geglu.__dict__
            out = spec.module(**feeds)
    assert n == len(attention_modules(tiny.unet)) // 2  # one feed-forward per block of two attentions
    assert torch.allclose(ref, out, atol=1e-6)
    assert "forward" not in geglu.__dict__
    model = onnx.load(str(fp32_dir / ArtifactSet.load(fp32_dir).find("onnx", "unet").path))
    ff = [node.op_type for node in model.graph.node if "/ff/" in node.name]
    assert ff.count("MatMul") == 3 * n  # value, gate, output projections
    assert not {"Slice", "Split", "Shape", "Gather"} & set(ff)  # no split of a [B, S, 2F] tensor, no shape math


@pytest.mark.parametrize("form", FORMS)
def test_attention_forms_match_default(tiny, form):
    spec = wrap(tiny, "unet")
    feeds = example_inputs(tiny, "unet", 2)
    with torch.no_grad():
        ref = spec.module(**feeds)
        used = set()
        with attention_form(spec.module, form, used) as n:
            out = spec.module(**feeds)
    assert len(used) == n == 8
    assert torch.allclose(ref, out, atol=1e-5)
    assert type(tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor).__name__ != "FormProcessor"


def test_dynamic_batch_and_resolution(tiny, fp32_dir):
    aset = ArtifactSet.load(fp32_dir)
    sess = open_session(aset.find("onnx", "unet"), fp32_dir)
    spec = wrap(tiny, "unet")
    for batch, res in [(1, 16), (2, 24), (3, 32)]:
        feeds = example_inputs(tiny, "unet", batch, res)
        out = sess.run({k: v.numpy() for k, v in feeds.items()})["out_sample"]
        with torch.no_grad():
            ref = spec.module(**feeds).numpy()
        assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-4
    bad = example_inputs(tiny, "unet", 1, 16)
    with pytest.raises(ShapeError, match="multiple"):
        sess.run({**{k: v.numpy() for k, v in bad.items()}, "sample": np.zeros((1, 4, 7, 8), np.float32)})
    with pytest.raises(ShapeError, match="exported for"):
        sess.run({**{k: v.numpy() for k, v in bad.items()}, "sample": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(ShapeError, match="missing"):
        sess.run({"sample": bad["sample"].numpy()})


def test_fp16_export(tiny, tmp_path):
    aset = export_bundle(tiny, "arch:tiny", ["onnx"], ExportOptions(components=("unet", "vae_decoder"),
                                                                    precision="fp16"), tmp_path / "h")
    unet = aset.find("onnx", "unet")
    assert unet.inputs["sample"]["dtype"] == "float16" and unet.inputs["timestep"]["dtype"] == "float32"
    assert unet.details["fp32_islands"] == "timestep" and unet.details["fp16_trial"]["rel_l2"] < 0.01
    assert unet.details["fused_attention"] == 8
    model = onnx.load(str(tmp_path / "h" / unet.path))
    sin = [n for n in model.graph.node if n.op_type == "Sin"]
    assert sin and all("time_proj" in n.name for n in sin)
    weights = {t.data_type for t in model.graph.initializer if len(t.dims) == 4}
    assert weights == {onnx.TensorProto.FLOAT16}


def test_fp16_overflow_gets_a_larger_fp32_island(tmp_path):
    bundle = build_arch("tiny", seed=3)
    with torch.no_grad():
        bundle.vae.decoder.conv_in.weight.mul_(1e6)  # weights and activations far past fp16's 65504
    aset = export_bundle(bundle, "arch:tiny", ["onnx"], ExportOptions(components=("vae_decoder",),
                                                                      precision="fp16"), tmp_path / "o")
    art = aset.find("onnx", "vae_decoder")
    assert art.details["fp32_islands"] == "all"
    assert set(art.details["fp16_trial"]["rejected"]) == {"timestep", "timestep+norm+attention"}
    assert art.details["fp16_trial"]["rel_l2"] < 1e-3


def test_fp16_trouble_detects_nan_black_and_drift():
    ref = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert "NaN" in fp16_trouble(ref, np.full_like(ref, np.nan))
    assert "black" in fp16_trouble(ref, np.full_like(ref, -1.0))
    assert "relative L2" in fp16_trouble(ref, ref * 1.5)
    assert fp16_trouble(ref, ref.astype(np.float16)) is None


class _Cummax(torch.nn.Module):
    def forward(self, x):
        return x.cummax(dim=1).values


def test_unsupported_op_names_op_and_module_and_writes_nothing(tmp_path):
    bundle = build_arch("tiny", seed=3)
    bundle.unet.conv_act = _Cummax()
    out = tmp_path / "never"
    with pytest.raises(UnsupportedOpError, match=r"aten::cummax.*unet\.conv_act"):
        export_bundle(bundle, "arch:tiny", ["onnx"], ExportOptions(components=("unet",)), out)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert locate_op(wrap(bundle, "unet").module, example_inputs(bundle, "unet"), "aten::cummax") == "unet.conv_act"


def test_bad_options(tiny, tmp_path):
    with pytest.raises(UserError, match="unknown export target"):
        export_bundle(tiny, "arch:tiny", ["tflite"], ExportOptions(), tmp_path / "a")
    with pytest.raises(ShapeError):
        OnnxExporter().export(tiny, "unet", ExportOptions(resolutions=(18,)), tmp_path)
    with pytest.raises(UserError, match="component"):
        ExportOptions(components=("unet", "safety_checker"))
    with pytest.raises(ConfigError):
        wrap(build_arch("sdxl", device="meta"), "text_encoder")
    assert GateError.exit_code == 1


def test_cli_export_and_bad_input(tmp_path, run_cli):  # noqa: F811
    ok = subprocess.run([sys.executable, "-m", "pocketdiff", "export", "arch:tiny", "--components", "unet", "--out",
                         str(tmp_path / "c"), "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["artifacts"][0]["details"]["fused_attention"] == 8
    # the refusals in this process (the same `main` as `python -m pocketdiff`, without an interpreter start each)
    code, _, err = run_cli("export", "arch:tiny", "--resolutions", "18", "--out", tmp_path / "d")
    assert code == 2 and "multiples of" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()
    code, _, err = run_cli("export", "arch:tiny", "--targets", "nope", "--out", tmp_path / "e")
    assert code == 2 and "unknown export target" in err


def test_external_data_past_the_limit(tiny, tmp_path, monkeypatch):
    import pocketdiff.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 1 << 20)  # pretend 1 MiB is protobuf's 2 GB
    aset = export_bundle(tiny, "arch:tiny", ["onnx"], ExportOptions(components=("unet",)), tmp_path / "big")
    art = aset.find("onnx", "unet")
    folder = tmp_path / "big" / "onnx" / "unet"
    assert art.details["external_data"] and (folder / "model.onnx_data").stat().st_size > 1 << 20
    assert (folder / "model.onnx").stat().st_size < 1 << 20
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.onnx", "model.onnx_data"]
    sess = open_session(art, tmp_path / "big")
    feeds = example_inputs(tiny, "unet", 1)
    with torch.no_grad():
        ref = wrap(tiny, "unet").module(**feeds).numpy()
    assert np.abs(sess.run({k: v.numpy() for k, v in feeds.items()})["out_sample"] - ref).max() < 1e-4


def test_torch_export_dynamic_shapes_and_sdpa_count(tiny):
    from pocketdiff.export.components import torch_export_dynamic_shapes

    spec = wrap(tiny, "unet")
    used = set()
    with attention_form(spec.module, "sdpa", used):
        ep = torch.export.export(spec.module, (), kwargs=example_inputs(tiny, "unet", 2), strict=False,
                                 dynamic_shapes=torch_export_dynamic_shapes(tiny, "unet", max_resolution=64))
    sdpa = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_attention_math", "sdpa")
    calls = [n for n in ep.graph_module.graph.nodes
             if n.op == "call_function" and any(o in str(n.target) for o in sdpa)]
    assert len(calls) == len(used) == 8
    feeds = example_inputs(tiny, "unet", 1, 32)
    with torch.no_grad():
        assert torch.allclose(ep.module()(**feeds), spec.module(**feeds), atol=1e-5)

"""ExecuTorch export on arch:tiny: parity with PyTorch in the real runtime, shapes, and bad input."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import pocketdiff.export.executorch as et_export  # registers the "executorch" exporter
import pocketdiff.runtimes.executorch  # noqa: F401  registers the "executorch" runtime
from pocketdiff.errors import ConfigError, CorruptFileError, InputPathError, ShapeError, UnsupportedOpError
from pocketdiff.export.base import ArtifactSet, ExportOptions, export_bundle
from pocketdiff.export.components import example_inputs, wrap
from pocketdiff.export.rewrites import norms
from pocketdiff.runtimes.base import open_session


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """U-Net at batch 2 and the VAE decoder at batch 1 and 2 (ExecuTorch lowering is slow on 2 cores)."""
    out = tmp_path_factory.mktemp("et") / "artifacts"
    unet = export_bundle(tiny, "arch:tiny", ["executorch"], ExportOptions(components=("unet",), batch_sizes=(2,)),
                         out / "u")
    vae = export_bundle(tiny, "arch:tiny", ["executorch"],
                        ExportOptions(components=("vae_decoder",), batch_sizes=(1, 2)), out / "v")
    return {"unet": (unet, out / "u"), "vae_decoder": (vae, out / "v")}


def _parity(tiny, aset, folder, component, batch):
    artifact = aset.find("executorch", component)
    session = open_session(artifact, folder)
    feeds = example_inputs(tiny, component, batch, seed=5)
    with torch.no_grad():
        ref = wrap(tiny, component).module(**feeds).numpy().astype(np.float64)
    got = session.run({k: v.numpy() for k, v in feeds.items()})[artifact.outputs and next(iter(artifact.outputs))]
    return np.abs(got - ref).max(), np.linalg.norm(got - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("component,batch", [("unet", 2), ("vae_decoder", 1), ("vae_decoder", 2),
                                             ("unet", 4)])
def test_parity_with_pytorch(tiny, exported, component, batch):
    max_abs, rel_l2 = _parity(tiny, *exported[component], component, batch)
    assert max_abs < 1e-4 and rel_l2 < 1e-5, (max_abs, rel_l2)


def test_manifest_records_methods_and_delegation(exported):
    aset, folder = exported["vae_decoder"]
    a = aset.find("executorch", "vae_decoder")
    assert set(a.details["methods"]) == {"b1_8x8", "b2_8x8"}
    assert a.inputs["latent_sample"]["shape"] == ["batch", 4, 8, 8]
    assert a.details["input_order"] == ["latent_sample"] and a.details["output_order"] == ["sample"]
    unet = exported["unet"][0].find("executorch", "unet")
    assert unet.details["winograd"]["rewritten"] == {}  # "auto": no tiny layer shape is in the measured table
    ops = unet.details["ops"]["b2_8x8"]
    # every norm and attention inside XNNPACK: only upsampling and layout copies stay outside
    assert ops["delegates"] >= 1 and unet.details["norms_rewritten"] > 0
    assert not any("group_norm" in k or "layer_norm" in k or "softmax" in k or "bmm" in k
                   for k in ops["outside_delegates"]), ops["outside_delegates"]
    assert ArtifactSet.load(folder).find("executorch", "vae_decoder").details["methods"] == a.details["methods"]


def test_norm_rewrites_are_exact():
    torch.manual_seed(0)
    gn, ln = nn.GroupNorm(4, 16), nn.LayerNorm(16)
    nn.init.normal_(gn.weight), nn.init.normal_(ln.bias)
    x4, x3 = torch.randn(2, 16, 5, 7) * 3 + 1, torch.randn(2, 9, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(norms.XnnpackGroupNorm(gn)(x4), gn(x4), atol=1e-5)
        assert torch.allclose(norms.XnnpackGroupNorm(gn)(x4.flatten(2)), gn(x4.flatten(2)), atol=1e-5)
        assert torch.allclose(norms.XnnpackLayerNorm(ln)(x3), ln(x3), atol=1e-5)


def test_fp16_norms_upcast_to_fp32_and_fp32_graphs_get_no_casts():
    torch.manual_seed(0)
    gn, ln = nn.GroupNorm(4, 16), nn.LayerNorm(16)
    nn.init.normal_(gn.weight), nn.init.normal_(ln.bias)
    x4, x3 = torch.randn(2, 16, 5, 7) * 30 + 10, torch.randn(2, 9, 16) * 20 - 10
    for norm, form, x in [(gn, norms.XnnpackGroupNorm, x4), (ln, norms.XnnpackLayerNorm, x3)]:
        half = copy.deepcopy(norm).half()
        with torch.no_grad():
            ref = copy.deepcopy(half).float()(x.half().float())  # fp32 norm of the fp16 input and weights
            out = form(half, upcast=True)(x.half())
        assert out.dtype == torch.float16
        # fp32 arithmetic, one rounding to fp16 at the end: within half an fp16 ulp of the fp32 result (+ fp32 noise)
        assert ((out.float() - ref).abs() <= ref.abs() * 2 ** -11 + 1e-4).all()

    def casts(module: nn.Module, x: torch.Tensor) -> int:
        graph = torch.export.export(module, (x,)).graph
        return sum("to_copy" in str(n.target) or "aten.to" in str(n.target) for n in graph.nodes)

    assert casts(norms.XnnpackGroupNorm(gn, upcast=True), x4) == 0  # fp32 in: nothing to cast
    assert casts(norms.XnnpackGroupNorm(copy.deepcopy(gn).half(), upcast=True), x4.half()) >= 2
    assert casts(norms.XnnpackGroupNorm(copy.deepcopy(gn).half(), upcast=False), x4.half()) == 0
    with pytest.raises(ConfigError, match="norm statistics"):
        norms.rewrite_norms(nn.Sequential(gn), "bf16")


def test_shape_outside_export_is_shape_error(tiny, exported):
    aset, folder = exported["vae_decoder"]
    session = open_session(aset.find("executorch", "vae_decoder"), folder)
    with pytest.raises(ShapeError, match="outside what this ExecuTorch artifact was exported for"):
        session.run({"latent_sample": np.zeros((1, 4, 12, 12), np.float32)})
    with pytest.raises(ShapeError, match="missing"):
        session.run({})


def test_a_method_that_fails_while_running_is_a_runtime_failure(exported, monkeypatch):
    from pocketdiff.errors import RuntimeFailure

    aset, folder = exported["vae_decoder"]
    session = open_session(aset.find("executorch", "vae_decoder"), folder)

    class Broken:
        def execute(self, inputs):
            raise RuntimeError("Attempted to resize a static tensor")

    monkeypatch.setattr(session, "method", lambda name: Broken())
    with pytest.raises(RuntimeFailure, match="failed running method .* resize a static tensor") as e:
        session.run({"latent_sample": np.zeros((1, 4, 8, 8), np.float32)})
    assert e.value.exit_code == 1


def test_corrupt_and_missing_files(exported, tmp_path):
    aset, folder = exported["vae_decoder"]
    artifact = aset.find("executorch", "vae_decoder")
    bad = tmp_path / artifact.path
    bad.parent.mkdir(parents=True)
    bad.write_bytes((folder / artifact.path).read_bytes()[:4096])
    with pytest.raises(CorruptFileError, match="ExecuTorch cannot load it"):
        open_session(artifact, tmp_path)
    bad.write_bytes(b"not a program" * 100)
    with pytest.raises(CorruptFileError):
        open_session(artifact, tmp_path)
    bad.unlink()
    with pytest.raises(InputPathError, match="missing"):
        open_session(artifact, tmp_path)
    with pytest.raises(InputPathError, match="no executorch text_encoder"):
        aset.find("executorch", "text_encoder")


class _Inverse(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.inv(x)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Sequential(_Inverse())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x))


def test_unsupported_op_names_op_and_module():
    with pytest.raises(UnsupportedOpError, match=r"linalg_inv.*module head\.0"):
        et_export.pocketdiff_lowering(_Toy().eval(), {"b1": {"x": torch.randn(1, 4, 4)}}, "toy")


def test_fp16_program_is_delegated_and_close(tiny, tmp_path):
    aset = export_bundle(tiny, "arch:tiny", ["executorch"],
                         ExportOptions(components=("unet",), batch_sizes=(1,), precision="fp16"), tmp_path / "a")
    artifact = aset.find("executorch", "unet")
    assert artifact.precision == "fp16" and artifact.inputs["sample"]["dtype"] == "float16"
    assert artifact.details["norm_statistics"] == "fp32"  # the default: norms computed in fp32 between casts
    ops = artifact.details["ops"]["b1_8x8"]
    assert ops["delegates"] >= 1
    assert not any("convolution" in k or "addmm" in k or "bmm" in k for k in ops["outside_delegates"]), ops
    max_abs, rel_l2 = _parity(tiny, aset, tmp_path / "a", "unet", 1)
    assert rel_l2 < 5e-3, (max_abs, rel_l2)  # fp16 rounding, not a wrong graph (fp32 parity is 1e-5)


def test_coreml_delegate_lowers_here_and_is_static_only(tiny, tmp_path):
    from pocketdiff.errors import ConfigError

    opts = ExportOptions(components=("unet",), batch_sizes=(1,), extra={"executorch_delegate": "coreml"})
    aset = export_bundle(tiny, "arch:tiny", ["executorch"], opts, tmp_path / "a")
    artifact = aset.find("executorch", "unet")
    assert artifact.details["delegate"] == "CoreMLBackend"
    ops = artifact.details["ops"]["b1_8x8"]
    assert ops["delegates"] == 1 and not ops["outside_delegates"], ops  # the whole U-Net in one Core ML program
    session = open_session(artifact, tmp_path / "a")
    if not session.checks["backend_here"]:  # Linux: ExecuTorch's Core ML backend exists only on Apple platforms
        assert session.static_only and session.checks["methods"] == ["b1_8x8"]
        with pytest.raises(ShapeError, match="static check only"):
            session.run({k: v.numpy() for k, v in example_inputs(tiny, "unet", 1).items()})
    with pytest.raises(ConfigError, match="unknown ExecuTorch delegate"):
        export_bundle(tiny, "arch:tiny", ["executorch"],
                      ExportOptions(components=("unet",), extra={"executorch_delegate": "npu"}), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_winograd_f4_in_the_xnnpack_program_is_exact(tiny, tmp_path):
    opts = ExportOptions(components=("unet",), batch_sizes=(1,), extra={"winograd": "f4"})
    aset = export_bundle(tiny, "arch:tiny", ["executorch"], opts, tmp_path / "w")
    wino = aset.find("executorch", "unet").details["winograd"]
    assert wino["eligible"] > 0 and len(wino["rewritten"]) == wino["eligible"], wino
    assert set(wino["rewritten"].values()) == {4}
    max_abs, rel_l2 = _parity(tiny, aset, tmp_path / "w", "unet", 1)
    assert max_abs < 1e-4 and rel_l2 < 1e-5, (max_abs, rel_l2)

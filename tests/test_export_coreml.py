"""Core ML export on arch:tiny: Swift-package layout, enumerated shapes, op counts, static check, bad input."""

import platform

import coremltools as ct
import pytest
import torch
from torch import nn

import pocketdiff.export.coreml as cm  # registers the "coreml" exporter
import pocketdiff.runtimes.coreml as cm_rt  # registers the "coreml" runtime
from pocketdiff.errors import ConfigError, CorruptFileError, GateError, InputPathError, UnsupportedOpError
from pocketdiff.export.base import Artifact, ExportOptions, export_bundle
from pocketdiff.runtimes.base import open_session
from pocketdiff.zoo import build_arch


@pytest.fixture(scope="module")
def ios18(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("cm") / "a18"
    opts = ExportOptions(components=("text_encoder", "unet", "vae_decoder"), batch_sizes=(1, 2), resolutions=(16, 24),
                         extra={"deployment_target": "iOS18"})
    return export_bundle(tiny, "arch:tiny", ["coreml"], opts, out), out


def test_swift_package_layout(ios18):
    aset, out = ios18
    names = sorted(p.name for p in (out / "coreml").iterdir())
    assert {"TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage"} <= set(names)
    assert any(n.startswith("vocab") for n in names)
    unet = ct.utils.load_spec(str(out / "coreml" / "Unet.mlpackage"))
    assert [i.name for i in unet.description.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert [o.name for o in unet.description.output] == ["noise_pred"]
    assert unet.WhichOneof("Type") == "mlProgram"
    dec = ct.utils.load_spec(str(out / "coreml" / "VAEDecoder.mlpackage"))
    assert [i.name for i in dec.description.input] == ["z"] and [o.name for o in dec.description.output] == ["image"]


def test_enumerated_shapes_and_fused_attention_ios18(ios18):
    aset, out = ios18
    a = aset.find("coreml", "unet")
    shapes = cm_rt.io_shapes(ct.utils.load_spec(str(out / a.path)))
    assert sorted(map(tuple, shapes["sample"])) == [(1, 4, 8, 8), (1, 4, 12, 12), (2, 4, 8, 8), (2, 4, 12, 12)]
    assert [1, 32, 1, 77] in shapes["encoder_hidden_states"]  # the Swift package's [B, D, 1, 77] layout
    assert a.details["fused_attention"] == a.details["fused_attention_intended"] == a.details["attention_modules"] > 0
    assert a.details["ops"].get("softmax", 0) == 0
    dec = aset.find("coreml", "vae_decoder")
    assert dec.details["fused_attention"] == dec.details["fused_attention_intended"] == 1


def test_static_check_is_not_a_pass(ios18):
    aset, out = ios18
    session = open_session(aset.find("coreml", "unet"), out)
    if platform.system() != "Darwin":
        assert session.static_only
        assert session.checks["fused_attention"] > 0


def test_static_check_catches_wrong_promises(ios18):
    aset, out = ios18
    a = aset.find("coreml", "vae_decoder")
    wrong = Artifact(**{**a.__dict__, "shapes": [{"latent_sample": [1, 4, 20, 20]}]})
    with pytest.raises(GateError, match="does not accept shape"):
        cm_rt.static_check(wrong, out / a.path)
    wrong = Artifact(**{**a.__dict__, "details": {**a.details, "fused_attention_intended": 3}})
    with pytest.raises(GateError, match="scaled_dot_product_attention"):
        cm_rt.static_check(wrong, out / a.path)


def test_compressed_weights_decompress_to_reference(ios18, tmp_path):
    import coremltools.optimize.coreml as cto

    aset, out = ios18
    a = aset.find("coreml", "vae_decoder")
    model = ct.models.MLModel(str(out / a.path), skip_model_load=True)
    cfg = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric",
                                                                           weight_threshold=256))
    cto.linear_quantize_weights(model, cfg).save(str(tmp_path / "q.mlpackage"))
    q = Artifact(**{**a.__dict__, "path": "q.mlpackage"})
    report = cm_rt.static_check(q, tmp_path / "q.mlpackage", reference=out / a.path)
    assert report["compressed_ops"] and report["weights"]["worst_rel_l2"] < 1e-2
    with pytest.raises(GateError, match="decompresses"):
        cm_rt.static_check(q, tmp_path / "q.mlpackage", reference=out / a.path, tolerance=1e-6)


@pytest.mark.parametrize("target", ["iOS17", "iOS16"])
def test_older_targets_split_einsum_and_one_enumerated_input(tiny, tmp_path, target):
    opts = ExportOptions(components=("vae_decoder",), batch_sizes=(1, 2), resolutions=(16, 24),
                         extra={"deployment_target": target})
    a = cm.CoremlExporter().export(tiny, "vae_decoder", opts, tmp_path)
    assert a.details["attention_form"] == "split_einsum" and a.details["fused_attention"] == 0
    assert a.details["fixed_batch"] == 2 and a.details["enumerated_inputs"] == ["z"]
    assert cm_rt.io_shapes(ct.utils.load_spec(str(tmp_path / a.path)))["z"] == [[2, 4, 8, 8], [2, 4, 12, 12]]


def test_bad_deployment_target(tiny, tmp_path):
    with pytest.raises(ConfigError, match="iOS16, iOS17, iOS18"):
        cm.CoremlExporter().export(tiny, "vae_decoder", ExportOptions(extra={"deployment_target": "iOS15"}), tmp_path)


def test_corrupt_and_missing_package(ios18, tmp_path):
    aset, out = ios18
    a = aset.find("coreml", "vae_decoder")
    with pytest.raises(InputPathError, match="missing"):
        open_session(a, tmp_path)
    bad = tmp_path / a.path
    bad.mkdir(parents=True)
    (bad / "Manifest.json").write_text("{ not json")
    with pytest.raises(CorruptFileError, match="cannot read"):
        open_session(a, tmp_path)
    with pytest.raises(InputPathError, match="no coreml vae_encoder"):
        aset.find("coreml", "vae_encoder")


class _Erfinv(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.erfinv(torch.tanh(x))


def test_unsupported_op_names_op_and_module(tiny, tmp_path):
    bundle = build_arch("tiny", seed=3)
    bundle.vae.decoder.conv_act = _Erfinv()
    with pytest.raises(UnsupportedOpError, match=r"erfinv.*module vae\.decoder\.conv_act"):
        cm.CoremlExporter().export(bundle, "vae_decoder", ExportOptions(), tmp_path)


def test_bert_style_text_encoder_converts(tmp_path):
    """The built-in model's MiniLM encoder builds its mask with `new_ones`, which coremltools lacks."""
    from pocketdiff.sources import load_model

    bundle = load_model("fashion")
    a = cm.CoremlExporter().export(bundle, "text_encoder", ExportOptions(components=("text_encoder",)), tmp_path)
    spec = ct.utils.load_spec(str(tmp_path / a.path))
    assert a.path == "coreml/TextEncoder.mlpackage"
    assert [i.name for i in spec.description.input] == ["input_ids", "attention_mask"]
    assert a.details["ops"].get("gelu", 0) == bundle.text_encoder.config.num_hidden_layers

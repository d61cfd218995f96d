"""Validation harness: passes a good export, catches one corrupted weight, reports static-only, bad input."""

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_bad_input_cli import run_cli  # noqa: F401  (a fixture)

from pocketdiff.errors import ConfigError, CorruptFileError, GateError, InputPathError, ShapeError
from pocketdiff.export.base import Artifact, ArtifactSet, ExportOptions, export_bundle
from pocketdiff.runtimes import base as runtimes_base
from pocketdiff.runtimes.harness import STATIC, ValidateConfig, raise_on_failure, validate
from pocketdiff.zoo import build_arch

CONFIG = ValidateConfig(steps=4)


@pytest.fixture(scope="module")
def tiny():
    """Seed 0: `validate` without --model rebuilds the recorded `arch:tiny`, which means seed 0."""
    return build_arch("tiny", seed=0)
CORRUPT = "unet.down_blocks.0.resnets.0.conv1.weight"


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "art"
    export_bundle(tiny, "arch:tiny", ["onnx"],
                  ExportOptions(components=("text_encoder", "unet", "vae_decoder", "vae_encoder")), out)
    return out


def test_good_export_passes_with_parity_figures(tiny, exported):
    report = validate(exported, bundle=tiny, config=CONFIG)
    raise_on_failure(report)
    (t,) = report["targets"]
    assert t["status"] == "passed" and t["psnr_db"] >= 90 and t["gate_db"] == 90
    for comp in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        c = t["components"][comp]
        assert len(c["parity"]) == 2  # batch 1 and 2
        assert all(r["cosine"] > 0.99999 for r in c["parity"])
        assert c["status"] == "passed" and c["rel_l2"] < c["gate_rel_l2"] / 5  # clean exports sit far inside the gate


def _corrupt(src, dst):
    shutil.copytree(src, dst)
    path = dst / "onnx" / "unet" / "model.onnx"
    model = onnx.load(str(path))
    (init,) = [t for t in model.graph.initializer if t.name == CORRUPT]
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.5  # one weight of one convolution
    init.CopyFrom(numpy_helper.from_array(w, CORRUPT))
    onnx.save(model, str(path))


def test_one_corrupted_weight_fails_and_is_located(tiny, exported, tmp_path):
    _corrupt(exported, tmp_path / "bad")
    report = validate(tmp_path / "bad", bundle=tiny, config=CONFIG)
    (t,) = report["targets"]
    assert t["status"] == "failed" and t["psnr_db"] < 90
    assert t["failed_components"] == ["unet"]
    assert t["first_diverging_layer"]["layer"] == "unet.down_blocks.0.resnets.0.conv1"
    with pytest.raises(GateError, match=r"unet.*down_blocks\.0\.resnets\.0\.conv1"):
        raise_on_failure(report)


def test_cli_validate_exit_codes(exported, tmp_path, run_cli):  # noqa: F811
    ok = subprocess.run([sys.executable, "-m", "pocketdiff", "validate", str(exported), "--steps", "2", "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["passed"] is True
    # the failures in this process (the same `main` as `python -m pocketdiff`, without an interpreter start each)
    _corrupt(exported, tmp_path / "bad")
    code, _, err = run_cli("validate", tmp_path / "bad", "--steps", "2")
    assert code == 1 and "conv1" in err and "Traceback" not in err
    missing = tmp_path / "missing"
    shutil.copytree(exported, missing)
    shutil.rmtree(missing / "onnx" / "vae_decoder")
    code, _, err = run_cli("validate", missing)
    assert code == 2 and "vae_decoder" in err
    code, _, err = run_cli("validate", tmp_path / "nowhere")
    assert code == 2 and "artifact folder" in err


def test_bad_artifacts(tiny, exported, tmp_path):
    truncated = tmp_path / "trunc"
    shutil.copytree(exported, truncated)
    f = truncated / "onnx" / "unet" / "model.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(CorruptFileError, match="unet"):
        validate(truncated, bundle=tiny, config=CONFIG)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "artifacts.json").write_text("{not json")
    with pytest.raises(CorruptFileError):
        validate(tmp_path / "junk", bundle=tiny)
    with pytest.raises(InputPathError):
        ArtifactSet.load(exported).find("onnx", "safety_checker")
    sess = runtimes_base.open_session(ArtifactSet.load(exported).find("onnx", "vae_decoder"), exported)
    with pytest.raises(ShapeError):
        sess.run({"latent_sample": np.zeros((1, 4, 8), np.float32)})


@dataclass
class _StaticSession:
    static_only: bool = True
    checks = {"loads": True}

    def run(self, feeds):
        raise AssertionError("a static-only session must never be run")


class _StaticRuntime:
    target = "static-test"

    def open(self, artifact, folder):
        return _StaticSession()


def test_static_only_is_never_passed(tiny, exported, tmp_path):
    folder = tmp_path / "static"
    shutil.copytree(exported, folder)
    aset = ArtifactSet.load(folder)
    aset.artifacts.append(Artifact(target="static-test", component="unet", path="onnx/unet/model.onnx",
                                   precision="fp16", inputs={}, outputs={}))
    aset.save(folder)
    runtimes_base.RUNTIMES.register(_StaticRuntime)
    try:
        report = validate(folder, bundle=tiny, targets=["static-test"], config=CONFIG)
    finally:
        runtimes_base.RUNTIMES.unregister("static-test")
    (t,) = report["targets"]
    assert t["status"] == STATIC and report["passed"] is False and report["failed"] == []
    assert t["components"]["unet"]["status"] == STATIC


def test_diverging_layer_found_through_a_winograd_rewrite(tiny, tmp_path):
    from pocketdiff.export.components import example_inputs, wrap
    from pocketdiff.runtimes.onnx import first_diverging_layer

    aset = export_bundle(tiny, "arch:tiny", ["onnx"], ExportOptions(components=("unet",), extra={"winograd": "f2"}),
                         tmp_path / "w")
    art = aset.find("onnx", "unet")
    path = tmp_path / "w" / art.path
    model = onnx.load(str(path))
    name = "/unet/down_blocks.0/resnets.0/conv1/Conv/winograd2/weights"
    (init,) = [t for t in model.graph.initializer if t.name == name]
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, name))
    onnx.save(model, str(path))
    found = first_diverging_layer(art, tmp_path / "w", wrap(tiny, "unet").module, example_inputs(tiny, "unet"), 1e-3)
    assert found["layer"] == "unet.down_blocks.0.resnets.0.conv1"


def test_diverging_layer_in_a_wrapper_that_calls_a_method(tiny, exported, tmp_path):
    """The VAE decoder wrapper calls vae.decode(), so node scopes lack the "vae." prefix."""
    from pocketdiff.export.components import example_inputs, wrap
    from pocketdiff.runtimes.onnx import first_diverging_layer

    folder = tmp_path / "v"
    shutil.copytree(exported, folder)
    path = folder / "onnx" / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    (init,) = [t for t in model.graph.initializer if t.name == "vae.decoder.mid_block.resnets.0.conv2.weight"]
    w = numpy_helper.to_array(init).copy()
    w.flat[3] -= 1.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    art = ArtifactSet.load(folder).find("onnx", "vae_decoder")
    found = first_diverging_layer(art, folder, wrap(tiny, "vae_decoder").module,
                                  example_inputs(tiny, "vae_decoder"), 1e-3)
    assert found["layer"] == "vae.decoder.mid_block.resnets.0.conv2"


def test_reference_weights_changed_since_export_is_named(tiny, exported, tmp_path):
    """Validating against weights other than the exported ones would report a bogus divergence."""
    folder = tmp_path / "stale"
    shutil.copytree(exported, folder)
    aset = ArtifactSet.load(folder)
    aset.model_hash = "a" * 64
    aset.save(folder)
    changed = build_arch("tiny", seed=0)
    changed.manifest.content_hash = "b" * 64
    with pytest.raises(ConfigError, match="not the one .* was exported from"):
        validate(folder, bundle=changed, config=CONFIG)
    changed.manifest.content_hash = "a" * 64
    assert validate(folder, bundle=changed, config=CONFIG)["passed"]


FAST = ValidateConfig(prompts=("a dress",), steps=2)


def _plant(folder, component, fragment, change):
    """Apply `change` to the weight of the first ONNX node whose name contains `fragment`."""
    path = folder / "onnx" / component / "model.onnx"
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if fragment in n.name and any(i in inits for i in n.input))
    init = next(inits[i] for i in node.input if i in inits and len(inits[i].dims) >= 2)
    w = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(change(w.copy()).astype(w.dtype), init.name))
    onnx.save(model, str(path))


def test_attention_projection_scaled_by_1_01_fails_the_unet_gate(tiny, exported, tmp_path):
    """A 1 % change in one projection passed the old 60 dB end-to-end gate; the component gate names it."""
    shutil.copytree(exported, tmp_path / "f")
    _plant(tmp_path / "f", "unet", "/attentions.0/transformer_blocks.0/attn1/to_q/", lambda w: w * 1.01)
    report = validate(tmp_path / "f", bundle=tiny, config=FAST)
    (t,) = report["targets"]
    unet = t["components"]["unet"]
    assert unet["status"] == "failed" and unet["rel_l2"] > 3 * unet["gate_rel_l2"]
    assert t["components"]["vae_decoder"]["status"] == "passed"
    assert t["failed_components"] == ["unet"] and t["psnr_db"] > 90  # end to end alone would have passed
    assert t["first_diverging_layer"]["layer"] == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    with pytest.raises(GateError, match=r"unet \(rel L2 .* gate 3e-05\)"):
        raise_on_failure(report)


def test_nan_weight_blames_the_unet_and_the_report_is_strict_json(tiny, exported, tmp_path):
    from pocketdiff.fileio import json_text

    shutil.copytree(exported, tmp_path / "n")

    def nan(w):
        w.flat[0] = np.nan
        return w
    _plant(tmp_path / "n", "unet", "/down_blocks.0/resnets.0/conv1/", nan)
    report = validate(tmp_path / "n", bundle=tiny, config=FAST)
    (t,) = report["targets"]
    assert t["failed_components"] == ["unet"]
    assert t["first_diverging_layer"]["layer"] == "unet.down_blocks.0.resnets.0.conv1"
    assert any(n.startswith("targets[0].psnr_db = NaN") for n in report["non_finite"])
    strict = json.loads(json_text(report), parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON report"))
    assert strict["targets"][0]["psnr_db"] is None and strict["targets"][0]["components"]["unet"]["rel_l2"] is None
    with pytest.raises(GateError, match="unet .non-finite output"):
        raise_on_failure(report)


def test_corrupt_artifact_fails_before_any_reference_image(tiny, exported, tmp_path, monkeypatch):
    from pocketdiff.runtimes import harness

    def no_sampling(*args, **kwargs):
        raise AssertionError("the reference was generated before the artifacts were checked")
    monkeypatch.setattr(harness, "generate", no_sampling)
    folder = tmp_path / "c"
    shutil.copytree(exported, folder)
    (folder / "onnx" / "vae_encoder" / "model.onnx").write_bytes(b"\x08garbage")
    with pytest.raises(CorruptFileError, match="vae_encoder"):
        validate(folder, bundle=tiny, config=CONFIG)


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside/model.onnx", "onnx/../../x.onnx", "C:\\x.onnx", ""])
def test_artifact_paths_are_confined_to_the_folder(exported, tmp_path, path):
    folder = tmp_path / "p"
    shutil.copytree(exported, folder)
    data = json.loads((folder / "artifacts.json").read_text())
    data["artifacts"][1]["path"] = path
    (folder / "artifacts.json").write_text(json.dumps(data))
    with pytest.raises(CorruptFileError, match=r"artifacts\[1\]\.path"):
        ArtifactSet.load(folder)


def test_artifact_path_through_a_link_out_of_the_folder_is_refused(exported, tmp_path):
    folder = tmp_path / "l"
    shutil.copytree(exported, folder)
    (tmp_path / "elsewhere").mkdir()
    (folder / "onnx" / "out").symlink_to(tmp_path / "elsewhere")
    data = json.loads((folder / "artifacts.json").read_text())
    data["artifacts"][0]["path"] = "onnx/out/model.onnx"
    (folder / "artifacts.json").write_text(json.dumps(data))
    with pytest.raises(CorruptFileError, match="outside the artifact folder"):
        ArtifactSet.load(folder)


def test_exported_configs_carry_no_build_paths(tiny, tmp_path):
    source = tmp_path / "model"
    tiny.save(source)
    from pocketdiff.bundle import Bundle

    export_bundle(Bundle.load(source), str(source), ["onnx"], ExportOptions(components=("text_encoder", "vae_decoder"),
                  batch_sizes=(1,)), tmp_path / "a")
    configs = [p for p in (tmp_path / "a").rglob("*.json") if p.name != "artifacts.json"]
    assert len(configs) >= 4
    for p in configs:
        assert str(tmp_path) not in p.read_text() and "_name_or_path" not in p.read_text(), p


def test_component_gate_widens_only_for_f4_winograd():
    from pocketdiff.runtimes.harness import COMPONENT_GATES, WINOGRAD_F4_FACTOR, component_gate

    def art(precision, details):
        return Artifact(target="onnx", component="vae_decoder", path="x.onnx", precision=precision, inputs={},
                        outputs={}, details=details)
    base = COMPONENT_GATES["fp32"]["vae_decoder"]
    assert component_gate(art("fp32", {"winograd": {"rewritten": {"/a/Conv": 2}}}), "fp32") == base
    assert component_gate(art("fp32", {"winograd": {"rewritten": {"/a/Conv": 2, "/b/Conv": 4}}}), "fp32") \
        == base * WINOGRAD_F4_FACTOR["fp32"]
    assert component_gate(art("fp16", {"winograd": {"rewritten": {"/b/Conv": 4}}}), "fp16") \
        == COMPONENT_GATES["fp16"]["vae_decoder"] * WINOGRAD_F4_FACTOR["fp16"]
    assert component_gate(art("fp32", {"winograd": "f4"}), "fp32") == base  # malformed details: no widening

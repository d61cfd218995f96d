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
    assert t["status"] == "passed" and t["psnr_db"] >= 60 and t["gate_db"] == 60
    for comp in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        rows = t["components"][comp]["parity"]
        assert len(rows) == 2  # batch 1 and 2
        assert all(r["cosine"] > 0.99999 and r["rel_l2"] < 1e-4 for r in rows)


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
    assert t["status"] == "failed" and t["psnr_db"] < 60
    assert t["failed_components"] == ["unet"]
    assert t["first_diverging_layer"]["layer"] == "unet.down_blocks.0.resnets.0.conv1"
    with pytest.raises(GateError, match=r"unet.*down_blocks\.0\.resnets\.0\.conv1"):
        raise_on_failure(report)


def test_cli_validate_exit_codes(exported, tmp_path):
    run = [sys.executable, "-m", "pocketdiff", "validate"]
    ok = subprocess.run(run + [str(exported), "--steps", "2", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["passed"] is True
    _corrupt(exported, tmp_path / "bad")
    bad = subprocess.run(run + [str(tmp_path / "bad"), "--steps", "2"], capture_output=True, text=True)
    assert bad.returncode == 1 and "conv1" in bad.stderr and "Traceback" not in bad.stderr
    missing = tmp_path / "missing"
    shutil.copytree(exported, missing)
    shutil.rmtree(missing / "onnx" / "vae_decoder")
    res = subprocess.run(run + [str(missing)], capture_output=True, text=True)
    assert res.returncode == 2 and "vae_decoder" in res.stderr
    res = subprocess.run(run + [str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert res.returncode == 2 and "artifact folder" in res.stderr


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

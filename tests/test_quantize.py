"""Quantization: the spec is recorded, calibration follows the sampler, every scheme runs in onnxruntime within
its gate, a broken calibration is refused naming the layer, bad input is one line and exit 2."""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from test_bad_input_cli import run_cli  # noqa: F401  (a fixture)

from pocketdiff.compress.quantize.calibration import CalibrationSet, MIN_PROMPTS, default_prompts, record_calibration
from pocketdiff.compress.quantize.spec import KEEP_FLOAT, SCHEMES, QuantSpec, make_spec
from pocketdiff.errors import ConfigError, CorruptFileError, GateError
from pocketdiff.export import onnx_quantize
from pocketdiff.export.base import ArtifactSet, ExportOptions, export_bundle
from pocketdiff.export.onnx import node_scope
from pocketdiff.export.quantize import Quantization, QuantizeExport, check_quantization
from pocketdiff.runtimes.harness import FALLBACK, raise_on_failure, validate
from pocketdiff.runtimes.quantize_gate import QuantizationGate
from pocketdiff.sampler import SampleConfig
from pocketdiff.zoo import build_arch

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
BROKEN_LAYER = "unet.down_blocks.1.resnets.0.conv1"
pytestmark = pytest.mark.usefixtures("one_thread")


def _export(bundle, scheme, calibration, out):
    spec = make_spec(scheme, COMPONENTS)
    options = check_quantization(["onnx"], spec, ExportOptions(components=COMPONENTS, batch_sizes=(1, 2)))
    gate = QuantizationGate(bundle)
    step = QuantizeExport(bundle, Quantization(spec, calibration if spec.needs_calibration else None), gate)
    export_bundle(bundle, "arch:tiny", ["onnx"], options, out, step=step)
    return gate.report


def test_spec_round_trips_and_refuses_other_versions():
    spec = make_spec("w8a8", COMPONENTS)
    assert spec.kinds == {"text_encoder": "w8", "unet": "w8a8", "vae_decoder": "w8"} and spec.needs_calibration
    assert {"conv_in", "conv_out", "time_embedding", "group_norm", "attention_softmax_v"} <= set(KEEP_FLOAT)
    back = QuantSpec.from_json(json.loads(json.dumps(spec.to_json())), "x")
    assert back == spec and back.gates["psnr_db"] == SCHEMES["w8a8"].gates.psnr_db
    with pytest.raises(CorruptFileError, match="version"):
        QuantSpec.from_json({**spec.to_json(), "version": 99}, "x")
    with pytest.raises(ConfigError, match="unknown quantization scheme 'int3'; choose from w8a8, w8, 8da8w, 8da4w"):
        make_spec("int3", COMPONENTS)


def test_calibration_replays_the_sampler_and_reproduces(tiny_bundle, calibration, tmp_path):
    meta = calibration.meta
    assert (meta["scheduler"], meta["steps"], meta["guidance_scale"]) == ("ddim", 8, 4.0)  # what validation samples
    prompts = meta["prompts"]
    assert len(set(prompts)) >= MIN_PROMPTS and calibration.calls == len(prompts) * meta["steps"]
    assert calibration.sample.shape[1] == 2  # every call holds the uncond and the cond half
    uncond, cond = calibration.context[0]
    assert not torch.equal(uncond, cond)
    assert torch.equal(calibration.context[1][0], uncond)  # the same empty-prompt states for every image
    steps = calibration.timestep[: meta["steps"], 0]
    assert steps.tolist() == sorted(steps.tolist(), reverse=True) and len(set(steps.tolist())) == meta["steps"]
    assert not set(prompts) & {"a photo of a sneaker", "a dress, product shot"}  # disjoint from the gates' prompts
    path = tmp_path / "cal.safetensors"
    calibration.save(path)
    loaded = CalibrationSet.load(path)
    again = record_calibration(tiny_bundle, SampleConfig.for_bundle(tiny_bundle, fallback=FALLBACK))
    assert loaded.fingerprint() == calibration.fingerprint() == again.fingerprint()
    with pytest.raises(ConfigError, match="at least 50 different prompts"):
        record_calibration(tiny_bundle, SampleConfig(), prompts=default_prompts()[:10])
    with pytest.raises(ConfigError, match="recorded on another model"):
        loaded.check_model(build_arch("tiny", seed=1))


ONNX_SCHEMES = [name for name, s in SCHEMES.items()
                if set(s.kinds.values()) <= {"float", *onnx_quantize.OnnxQuantizeStep.kinds}]


def test_onnx_runs_the_static_and_weight_only_schemes():
    assert ONNX_SCHEMES == ["w8a8", "w8"]  # the dynamic-linear schemes are ExecuTorch's (test_quantize_executorch)


@pytest.mark.parametrize("scheme", ONNX_SCHEMES)
def test_each_scheme_exports_runs_in_onnxruntime_and_passes_its_gate(tiny_bundle, calibration, scheme, tmp_path):
    out = tmp_path / "art"
    report = _export(tiny_bundle, scheme, calibration, out)
    (t,) = report["targets"]
    assert report["passed"] and t["psnr_db"] >= SCHEMES[scheme].gates.psnr_db
    aset = ArtifactSet.load(out)
    assert aset.quantization["scheme"] == scheme
    assert (aset.quantization["calibration"] is not None) == (scheme == "w8a8")
    for a in aset.artifacts:
        q = a.details["quantization"]
        assert q["kind"] == SCHEMES[scheme].kinds[a.component] and q["bits_per_weight"] < 12
        model = onnx.load(str(out / a.path))
        ops = Counter(n.op_type for n in model.graph.node)
        assert ops["DequantizeLinear"] > 0 and not ops["ConvInteger"] and not ops["DynamicQuantizeLinear"]
        assert (ops["QuantizeLinear"] > 0) == (q["kind"] == "w8a8")
        produced = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:  # the spec's float modules read float weights
            if node.op_type == "Conv" and node_scope(node.name).split(".")[-1] in ("conv_in", "conv_out"):
                assert node.input[1] not in produced or produced[node.input[1]].op_type != "DequantizeLinear"
    raise_on_failure(validate(out, bundle=tiny_bundle))  # `pocketdiff validate` takes the folder as it is


def test_broken_calibration_trips_the_gate_and_names_the_layer(tiny_bundle, calibration, tmp_path, monkeypatch):
    float_dir = tmp_path / "float"
    export_bundle(tiny_bundle, "arch:tiny", ["onnx"], ExportOptions(components=("unet",), extra={"winograd": "off"}),
                  float_dir)
    graph = onnx.load(str(float_dir / "onnx" / "unet" / "model.onnx")).graph
    (conv,) = [n for n in graph.node if node_scope(n.name) == BROKEN_LAYER]
    forced = {conv.input[0]: [{"scale": np.array(1e-8, np.float32), "zero_point": np.array(0, np.int8)}]}
    options = onnx_quantize.static_options()
    monkeypatch.setattr(onnx_quantize, "static_options", lambda: {**options, "TensorQuantOverrides": forced})
    out = tmp_path / "art"
    with pytest.raises(GateError, match=rf"refused, nothing written: .*unet.*first diverging layer {BROKEN_LAYER}"):
        _export(tiny_bundle, "w8a8", calibration, out)
    assert not out.exists() and not list(tmp_path.glob(".art.tmp-*"))


def test_bad_input_is_one_line_exit_2_and_writes_nothing(calibration, tmp_path, run_cli):  # noqa: F811
    other = tmp_path / "other.safetensors"
    CalibrationSet(meta={**calibration.meta, "model_fingerprint": "0" * 64}, **calibration.tensors()).save(other)
    out = tmp_path / "art"
    cases = [(["--quantize", "int3"], "unknown quantization scheme 'int3'"),
             (["--targets", "coreml", "--quantize", "w8a8"], "'coreml' has no quantize step yet"),
             (["--quantize", "w8a8", "--calibration", str(other)], "recorded on another model")]
    first, *rest = cases
    r = subprocess.run([sys.executable, "-m", "pocketdiff", "export", "arch:tiny", "--components", "unet", "--out",
                        str(out), *first[0]], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    results = [(r.returncode, r.stderr, first[1])]
    for extra, message in rest:  # the same `main` in this process: no interpreter start per case
        code, _, err = run_cli("export", "arch:tiny", "--components", "unet", "--out", out, *extra)
        results.append((code, err, message))
    for code, err, message in results:
        assert code == 2, err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not out.exists()

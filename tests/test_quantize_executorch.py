"""ExecuTorch quantization on arch:tiny: PT2E static int8 and the dynamic-linear kinds (8da8w, 8da4w) lower to XNNPACK
and run in ExecuTorch's runtime within their gates with the ops outside the delegate recorded, a broken calibration
is refused, and a scheme the chosen runtime cannot run is one line and exit 2."""

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e import FixedQParamsObserver

from pocketdiff import cli
from pocketdiff.compress.quantize.spec import INT4_GROUP, SCHEMES, make_spec
from pocketdiff.errors import GateError
from pocketdiff.export import executorch_quantize
from pocketdiff.export.base import ArtifactSet, ExportOptions, export_bundle
from pocketdiff.export.executorch import lower
from pocketdiff.export.quantize import Quantization, QuantizeExport, check_quantization
from pocketdiff.runtimes.harness import raise_on_failure, validate
from pocketdiff.runtimes.quantize_gate import QuantizationGate

COMPONENTS = ("unet",)  # the w8a8 scheme's other kinds (int8 weights, float activations) have no XNNPACK form
BROKEN_LAYER = "unet.down_blocks.1.resnets.0.conv1"
pytestmark = pytest.mark.usefixtures("one_thread")


def _export(bundle, calibration, out):
    """`pocketdiff export arch:tiny --targets executorch --components unet --quantize w8a8`, at the CFG batch only
    (each exported batch is one more slow lowering); returns the gate's report."""
    spec = make_spec("w8a8", COMPONENTS)
    options = check_quantization(["executorch"], spec, ExportOptions(components=COMPONENTS, batch_sizes=(2,)))
    gate = QuantizationGate(bundle)
    export_bundle(bundle, "arch:tiny", ["executorch"], options, out, step=QuantizeExport(
        bundle, Quantization(spec, calibration), gate))
    return gate.report


def test_static_int8_lowers_runs_and_passes_its_gate(tiny_bundle, calibration, tmp_path):
    out = tmp_path / "art"
    report = _export(tiny_bundle, calibration, out)
    (t,) = report["targets"]
    assert report["passed"] and t["target"] == "executorch" and t["psnr_db"] >= SCHEMES["w8a8"].gates.psnr_db
    aset = ArtifactSet.load(out)
    assert aset.quantization["scheme"] == "w8a8" and aset.quantization["calibration"]["calls"] == calibration.calls
    unet = aset.find("executorch", "unet")
    q = unet.details["quantization"]
    assert q["kind"] == "w8a8" and q["calibration_calls"] == calibration.calls and q["bits_per_weight"] < 16
    ops = unet.details["ops"]["b2_8x8"]
    assert ops["delegates"] >= 1 and unet.details["ops_outside_delegate"] == {
        "b2_8x8": sum(ops["outside_delegates"].values())}
    # the int8 convolutions and linears, their q/dq pairs and the float norms all went into XNNPACK
    assert not any(k.startswith("quantized_decomposed") or "convolution" in k or "addmm" in k
                   for k in ops["outside_delegates"]), ops["outside_delegates"]
    raise_on_failure(validate(out, bundle=tiny_bundle))  # `pocketdiff validate` takes the folder as it is


class _SkipAndResidual(nn.Module):
    """fashion's down_blocks.2 -> 3 in miniature: a downsampler whose int8 output is a U-Net skip (a delegate
    output) and the identity residual of the next resnet (equal widths, so no shortcut conv). arch:tiny's widths
    (32, 64) give that resnet a shortcut conv, so its U-Net never has this pattern."""

    def __init__(self):
        super().__init__()
        self.down, self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.down(x)
        return skip + self.conv(skip), skip


def test_an_int8_skip_that_is_also_a_residual_comes_back_in_its_layout():
    """XNNPACK's channels-last pass used to hand that skip back NHWC into an NCHW tensor (the fashion w8a8 fault:
    "Attempted to resize a static tensor")."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.runtime import Runtime

    torch.manual_seed(0)
    module, x = _SkipAndResidual().eval(), torch.randn(2, 8, 4, 4)
    programs, calls = executorch_quantize.quantize_programs(module, {"b2": {"x": x}}, "toy",
                                                            executorch_quantize.static_quantizer,
                                                            executorch_quantize.iter_one)
    data, ops = lower(programs, "toy", [XnnpackPartitioner()])
    assert calls == 1 and ops["b2"] == {"delegates": 1, "outside_delegates": {}}
    got = Runtime.get().load_program(data).load_method("b2").execute([x])
    with torch.no_grad():
        want = module(x)
    assert [tuple(t.shape) for t in got] == [(2, 8, 2, 2)] * 2
    for g, w in zip(got, want):
        assert (g - w).norm() / w.norm() < 0.05  # int8 rounding


def _force_input_scale(prepared, layer: str) -> None:
    """Replace the observer in front of `layer`'s convolution by one fixed at scale 1e-8 (a planted calibration fault)."""
    for node in prepared.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.target is torch.ops.aten.conv2d.default and stack and next(reversed(stack.values()))[0] == layer:
            observer = node.args[0]
            setattr(prepared, observer.target, FixedQParamsObserver(scale=1e-8, zero_point=0, dtype=torch.int8,
                                                                    quant_min=-128, quant_max=127))
            return
    raise AssertionError(f"no convolution of {layer} in the prepared graph")


def test_broken_calibration_trips_the_gate(tiny_bundle, calibration, tmp_path, monkeypatch):
    calibrate = executorch_quantize.calibrate

    def broken(prepared, feeds):
        calls = calibrate(prepared, feeds)
        _force_input_scale(prepared, BROKEN_LAYER)
        return calls

    monkeypatch.setattr(executorch_quantize, "calibrate", broken)
    out = tmp_path / "art"
    with pytest.raises(GateError, match=r"quantized artifacts \(w8a8\) refused, nothing written: executorch .*unet"):
        _export(tiny_bundle, calibration, out)
    assert not out.exists() and not list(tmp_path.glob(".art.tmp-*"))


@pytest.mark.parametrize("scheme", ["8da8w", "8da4w"])
def test_dynamic_linears_lower_run_and_pass_their_gate(tiny_bundle, scheme, tmp_path):
    """The text encoder is all linears: the fastest tiny graph that exercises these kinds end to end."""
    out = tmp_path / "art"
    spec = make_spec(scheme, ("text_encoder",))
    options = check_quantization(["executorch"], spec, ExportOptions(components=("text_encoder",), batch_sizes=(1,)))
    gate = QuantizationGate(tiny_bundle)
    export_bundle(tiny_bundle, "arch:tiny", ["executorch"], options, out,
                  step=QuantizeExport(tiny_bundle, Quantization(spec), gate))
    (t,) = gate.report["targets"]
    assert gate.report["passed"] and t["psnr_db"] >= SCHEMES[scheme].gates.psnr_db
    assert 0 < t["components"]["text_encoder"]["rel_l2"] <= SCHEMES[scheme].gates.rel_l2["text_encoder"]
    aset = ArtifactSet.load(out)
    assert aset.quantization["scheme"] == scheme and aset.quantization["calibration"] is None
    encoder = aset.find("executorch", "text_encoder")
    q = encoder.details["quantization"]
    assert q["kind"] == scheme and q["bits_per_weight"] > 0  # no size bound: the float embedding table is most of it
    if scheme == "8da4w":
        assert q["quantized_linears"] > 0 and q["int4_group"] == INT4_GROUP
    (ops,) = encoder.details["ops"].values()
    assert not any("linear" in k or "addmm" in k or "mm." in k or k.startswith(("quantized_decomposed", "torchao"))
                   for k in ops["outside_delegates"]), ops["outside_delegates"]


@pytest.mark.parametrize("target,scheme,runs", [("executorch", "w8", "w8a8, 8da8w, 8da4w"),
                                                ("onnx", "8da4w", "w8a8, w8")])
def test_a_scheme_the_runtime_cannot_run_is_one_line_exit_2(target, scheme, runs, tmp_path, capsys):
    """`pocketdiff export` in this process (the CLI's own error handling, without a second interpreter's imports)."""
    out = tmp_path / "art"
    code = cli.main(["export", "arch:tiny", "--targets", target, "--quantize", scheme, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{target} cannot run quantization scheme {scheme!r}" in err and f"it runs {runs}" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and not out.exists()

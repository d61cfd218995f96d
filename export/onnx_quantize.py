"""onnxruntime's quantize step: static W8A8 in QDQ form through onnxruntime's quantizer, int8 weights through NNCF.

- **w8a8**: `onnxruntime.quantization.quantize_static`, QDQ format, S8S8 (int8 activations and
  weights), weights symmetric per output channel, no reduce_range (this host's AVX-512 VNNI runs
  full-range int8), MinMax ranges over every recorded U-Net call of the sampler. Only Conv, MatMul
  and Gemm are quantized, so normalisations and the fused attention's softmax·V stay float; never
  dynamic quantization (ConvInteger is onnxruntime's slow path for convolutions).
- **w8**: `nncf.compress_weights` INT8_SYM (per output channel) on the ONNX graph: int8 weights
  behind DequantizeLinear, float activations.
In both, the nodes of the spec's float modules (conv_in, conv_out, the timestep embedding) are left out.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..bundle import Bundle
from ..compress.quantize.calibration import CalibrationSet
from ..compress.quantize.spec import KEEP_FLOAT_MODULES, QuantSpec
from ..errors import ConfigError
from .base import Artifact
from .onnx import constants_to_initializers, initializer_bytes, node_scope, save_model
from .quantize import register_quantize_step

QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]


def float_nodes(model: onnx.ModelProto, modules: tuple[str, ...] = KEEP_FLOAT_MODULES) -> list[str]:
    """Names of the nodes traced from a module the spec keeps float (any scope part equal to one of `modules`)."""
    return [n.name for n in model.graph.node if set(node_scope(n.name).split(".")) & set(modules)]


def weight_elements(model: onnx.ModelProto) -> int:
    """Number of float weight values (float initializers) in a graph: the denominator of bits per weight."""
    return sum(int(np.prod(t.dims)) if t.dims else 1 for t in model.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))


def static_options() -> dict[str, Any]:
    """`extra_options` of quantize_static: symmetric weights, asymmetric int8 activations."""
    return {"WeightSymmetric": True, "ActivationSymmetric": False}


class _Feeds:
    """onnxruntime CalibrationDataReader over a calibration set's U-Net calls."""

    def __init__(self, calibration: CalibrationSet):
        self.feeds = calibration.unet_feeds()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def _static_w8a8(bundle: Bundle, artifact: Artifact, spec: QuantSpec, calibration: CalibrationSet | None,
                 out: Path) -> dict[str, Any]:
    """Static int8 QDQ of the artifact's convolutions and linear layers, ranges from `calibration`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibration is None or artifact.component != "unet":
        raise ConfigError(f"static int8 activations need the U-Net's calibration set; {artifact.component} "
                          "has none (give it a weight-only kind)")
    path = out / artifact.path
    model = constants_to_initializers(onnx.load(str(path)))  # weights held in Constant nodes are weights too
    before = weight_elements(model)
    skip = float_nodes(model)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        source, target = Path(tmp) / "float" / "model.onnx", Path(tmp) / "model.onnx"
        save_model(model, source)
        with _quiet():
            quantize_static(str(source), str(target), _Feeds(calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=False, op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=skip,
                            calibrate_method=CalibrationMethod.MinMax, extra_options=static_options(),
                            use_external_data_format=bool(artifact.details.get("external_data")))
        quantized = onnx.load(str(target))
    return _replace(artifact, quantized, out, before, skip, calibration.calls)


def _weight_only_int8(bundle: Bundle, artifact: Artifact, spec: QuantSpec, calibration: CalibrationSet | None,
                      out: Path) -> dict[str, Any]:
    """int8 weights (symmetric, per output channel) through NNCF; activations stay float."""
    import nncf

    path = out / artifact.path
    model = constants_to_initializers(onnx.load(str(path)))
    before = weight_elements(model)
    skip = float_nodes(model)
    with _quiet():
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM,
                                           ignored_scope=nncf.IgnoredScope(names=skip, validate=False))
    return _replace(artifact, flat_axis_scales(compressed), out, before, skip, 0)


def flat_axis_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    """Per-axis DequantizeLinear scales and zero points as the 1-D tensors ONNX requires (NNCF 3.4 writes
    convolution scales as [C, 1, 1], which onnxruntime refuses)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        for name in node.input[1:]:
            if name in inits and len(inits[name].dims) > 1:
                inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]).reshape(-1), name))
    return model


def _replace(artifact: Artifact, model: onnx.ModelProto, out: Path, before: int, skip: list[str],
             calls: int) -> dict[str, Any]:
    """Save the quantized graph over the artifact's; the details to record (sizes, bits per weight, node counts)."""
    path = out / artifact.path
    external = save_model(model, path)
    onnx.checker.check_model(str(path))
    ops = [n.op_type for n in model.graph.node]
    return {"bytes": sum(p.stat().st_size for p in path.parent.iterdir()), "external_data": external,
            "quantization": {"bits_per_weight": 8 * initializer_bytes(model) / max(before, 1),
                             "quantized_weights": ops.count("DequantizeLinear") - ops.count("QuantizeLinear"),
                             "activations_quantized": ops.count("QuantizeLinear"), "float_nodes": len(skip),
                             "calibration_calls": calls}}


@contextlib.contextmanager
def _quiet() -> Any:
    """Keep the quantizers' progress bars and advice off stdout (where --json output goes)."""
    previous = logging.root.level
    logging.root.setLevel(logging.ERROR)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logging.root.setLevel(previous)


@register_quantize_step
class OnnxQuantizeStep:
    """Target "onnx": the kinds onnxruntime runs."""

    target = "onnx"
    kinds = {"w8a8": _static_w8a8, "w8": _weight_only_int8}

"""ExecuTorch's quantize step: PT2E int8 through ExecuTorch's XNNPACKQuantizer, and torchao's 8da4w, lowered to XNNPACK.

- **w8a8**: `XNNPACKQuantizer` with `get_symmetric_quantization_config(is_per_channel=True)` (int8
  weights symmetric per output channel, int8 activations with static ranges from its observers) on the
  convolutions and linear layers, torchao's `prepare_pt2e` / `convert_pt2e` around a calibration pass over
  every recorded U-Net call of the sampler.
- **8da8w**: the same quantizer with `is_dynamic=True` on the linear layers only (XNNPACK's dynamically
  quantized fully-connected kernels: int8 weights per output channel, each call's activations quantized
  from their own range), so no calibration set; any component.
- **8da4w**: torchao's `quantize_` with `Int8DynamicActivationIntxWeightConfig` (int4 weights symmetric per
  group of `INT4_GROUP` input channels, int8 activations per token at run time) on the linear layers, the
  form ExecuTorch's XNNPACK partitioner matches to its blockwise-int4 kernels; any component.
Each then goes through pocketdiff's XNNPACK lowering (`export.executorch`: norm rewrites, explicit attention,
one method per exported shape) with the partitioner taking quantized and float nodes alike. The spec's float
modules (conv_in, conv_out, the timestep embedding) and the norm rewrites are left out of the annotation;
attention's batched matmuls are never annotated, so softmax·V stays float. The .pte is lowered again from
the Bundle's module (a lowered program cannot be quantized) and replaces the float one; each method's count
of ops left outside the delegate is recorded beside its op table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bundle import Bundle
from ..compress.quantize.calibration import CalibrationSet
from ..compress.quantize.spec import INT4_GROUP, KEEP_FLOAT_MODULES, QuantSpec
from ..errors import ConfigError
from ..fileio import atomic_write_bytes
from .base import Artifact
from .components import wrap
from .executorch import ATTENTION_FORM, export_programs, lower, prepare
from .quantize import register_quantize_step
from .rewrites.attention import attention_form
from .rewrites.norms import XnnpackGroupNorm, XnnpackLayerNorm

QUANTIZED_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
_FLOAT_TYPES = tuple(f"{t.__module__}.{t.__qualname__}" for t in (XnnpackGroupNorm, XnnpackLayerNorm))


def outside_delegate(ops: dict[str, Any]) -> dict[str, int]:
    """Per method, how many op calls a lowered program runs outside its delegates (from `lower`'s op table)."""
    return {m: sum(c["outside_delegates"].values()) for m, c in ops.items()}


def quantizable(node: torch.fx.Node) -> bool:
    """Whether the quantizer may annotate `node`: not inside a module the spec keeps float, nor a norm rewrite."""
    stack = (node.meta.get("nn_module_stack") or {}).values()
    return not any(set(path.split(".")) & set(KEEP_FLOAT_MODULES) or str(kind) in _FLOAT_TYPES
                   for path, kind in stack)


def static_quantizer() -> Any:
    """ExecuTorch's XNNPACKQuantizer for static int8 convolutions and linears (per-channel symmetric weights)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)

    config = get_symmetric_quantization_config(is_per_channel=True)
    quantizer = XNNPACKQuantizer().set_filter_function(quantizable)
    for op in QUANTIZED_OPS:
        quantizer.set_operator_type(op, config)
    return quantizer


def dynamic_quantizer() -> Any:
    """ExecuTorch's XNNPACKQuantizer for dynamically quantized linears (int8 weights per output channel, each call's
    activations quantized from their own range)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    return XNNPACKQuantizer().set_filter_function(quantizable).set_operator_type(torch.ops.aten.linear.default, config)


def iter_one(feeds: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """`feeds` once: the one call a dynamic quantizer's prepared module needs (its observers record no ranges)."""
    yield feeds


def method_feeds(artifact: Artifact) -> dict[str, dict[str, torch.Tensor]]:
    """Placeholder inputs of every exported method at its recorded shapes and dtypes, in the artifact's input
    order (the program's argument order; export needs shapes only)."""
    order = artifact.details["input_order"]
    return {method: {n: torch.zeros(shapes[n], dtype=getattr(torch, artifact.inputs[n]["dtype"])) for n in order}
            for method, shapes in artifact.details["methods"].items()}


def batches(calibration: CalibrationSet, like: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """The recorded U-Net calls regrouped to the batch of `like` (one method's inputs); ConfigError if their
    other dimensions differ from the method's."""
    batch = next(iter(like.values())).shape[0]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in like}
    for feed in calibration.unet_feeds():
        for name, value in feed.items():
            if name not in like or tuple(value.shape[1:]) != tuple(like[name].shape[1:]):
                raise ConfigError(f"the calibration set's {name} {list(value.shape)} does not fit the exported U-Net "
                                  f"input {list(like[name].shape) if name in like else 'set'}; export the U-Net at "
                                  "the resolution the set was recorded at")
            rows[name].extend(torch.from_numpy(value).to(like[name].dtype))
        while len(rows[next(iter(rows))]) >= batch:
            yield {n: torch.stack(r[:batch]) for n, r in rows.items()}
            rows = {n: r[batch:] for n, r in rows.items()}


def calibrate(prepared: nn.Module, feeds: Iterator[dict[str, torch.Tensor]]) -> int:
    """Run the observed module over every feed (its observers record the ranges); returns the call count."""
    calls = 0
    with torch.no_grad():
        for feed in feeds:
            prepared(**feed)
            calls += 1
    return calls


def quantize_programs(module: nn.Module, inputs: dict[str, dict[str, torch.Tensor]], component: str,
                      quantizer: Callable[[], Any],
                      feeds: Callable[[dict[str, torch.Tensor]], Iterator[dict[str, torch.Tensor]]]) -> tuple[dict[str, Any], int]:
    """Per method: torch.export, PT2E prepare with a fresh `quantizer()`, `calibrate` over `feeds` of that method's
    inputs, convert, and export again for lowering; returns the programs and the calls per method."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared, _ = prepare(module)
    programs, calls = {}, 0
    with attention_form(prepared, ATTENTION_FORM):
        for method, ep in export_programs(prepared, inputs, component).items():
            observed = prepare_pt2e(ep.module(), quantizer())
            calls = calibrate(observed, feeds(inputs[method]))
            converted = convert_pt2e(observed)
            programs[method] = export_programs(converted, {method: inputs[method]}, component)[method]
    return programs, calls


def int4_linear(module: nn.Module, fqn: str) -> bool:
    """Whether torchao's 8da4w takes this module: a linear layer outside the spec's float modules whose input
    channels split into whole groups of `INT4_GROUP`."""
    return (isinstance(module, nn.Linear) and module.in_features % INT4_GROUP == 0
            and not set(fqn.split(".")) & set(KEEP_FLOAT_MODULES))


def int4_programs(module: nn.Module, inputs: dict[str, dict[str, torch.Tensor]],
                  component: str) -> tuple[dict[str, Any], int]:
    """torchao's 8da4w on the norm-rewritten copy's linears, then one torch.export per method; returns the
    programs and how many linears were quantized."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_

    prepared, _ = prepare(module)
    linears = sum(int4_linear(m, name) for name, m in prepared.named_modules())
    quantize_(prepared, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                              weight_granularity=PerGroup(INT4_GROUP)),
              filter_fn=int4_linear)
    with attention_form(prepared, ATTENTION_FORM):
        return export_programs(prepared, inputs, component), linears


def _check_xnnpack(artifact: Artifact) -> None:
    """ConfigError unless the float artifact was lowered to XNNPACK (the only delegate with int8 kernels here)."""
    if artifact.details.get("delegate", "XnnpackBackend") != "XnnpackBackend":
        raise ConfigError("ExecuTorch int8 runs through XNNPACK; drop --executorch-delegate")


def dynamic_partitioners() -> list[Any]:
    """XNNPACK's partitioners for a graph with dynamically quantized linears: those first, one delegate call each
    (`per_op_mode`; one shared partition of all precisions forms a dependency cycle on a U-Net), then the rest."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (XnnpackDynamicallyQuantizedPartitioner,
                                                                           XnnpackPartitioner)

    return [XnnpackDynamicallyQuantizedPartitioner(per_op_mode=True), XnnpackPartitioner()]


def _write(module: nn.Module, artifact: Artifact, programs: dict[str, Any], out: Path, start: float,
           quantization: dict[str, Any], partitioners: list[Any] | None = None) -> dict[str, Any]:
    """Lower `programs` to XNNPACK (one all-precision partitioner unless `partitioners` are given), write the .pte
    over the float one, and return the details to record."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    data, ops = lower(programs, artifact.component, partitioners or [XnnpackPartitioner()])
    path = out / artifact.path
    atomic_write_bytes(path, data)
    weights = sum(t.numel() for t in module.state_dict().values() if t.is_floating_point())
    return {"bytes": path.stat().st_size, "ops": ops, "ops_outside_delegate": outside_delegate(ops),
            "quantize_seconds": round(time.perf_counter() - start, 2),
            "quantization": {"bits_per_weight": 8 * path.stat().st_size / max(weights, 1),
                             "float_modules": list(KEEP_FLOAT_MODULES), **quantization}}


def _static_w8a8(bundle: Bundle, artifact: Artifact, spec: QuantSpec, calibration: CalibrationSet | None,
                 out: Path) -> dict[str, Any]:
    """Static int8 convolutions and linears, ranges observed over `calibration`, lowered to XNNPACK."""
    if calibration is None or artifact.component != "unet":
        raise ConfigError(f"static int8 activations need the U-Net's calibration set; {artifact.component} "
                          "has none (give it a weight-only kind)")
    _check_xnnpack(artifact)
    start = time.perf_counter()
    module = wrap(bundle, artifact.component).module
    programs, calls = quantize_programs(module, method_feeds(artifact), artifact.component, static_quantizer,
                                        lambda like: batches(calibration, like))
    return _write(module, artifact, programs, out, start,
                  {"quantized_ops": [str(op) for op in QUANTIZED_OPS], "calibration_calls": calls})


def _dynamic_8da8w(bundle: Bundle, artifact: Artifact, spec: QuantSpec, calibration: CalibrationSet | None,
                   out: Path) -> dict[str, Any]:
    """Linears with int8 weights per output channel and int8 activations quantized per call, lowered to XNNPACK."""
    _check_xnnpack(artifact)
    start = time.perf_counter()
    module = wrap(bundle, artifact.component).module
    programs, _ = quantize_programs(module, method_feeds(artifact), artifact.component, dynamic_quantizer, iter_one)
    return _write(module, artifact, programs, out, start, {"quantized_ops": [str(torch.ops.aten.linear.default)]},
                  dynamic_partitioners())


def _dynamic_8da4w(bundle: Bundle, artifact: Artifact, spec: QuantSpec, calibration: CalibrationSet | None,
                   out: Path) -> dict[str, Any]:
    """Linears with int4 weights per group and int8 activations per token at run time, lowered to XNNPACK."""
    _check_xnnpack(artifact)
    start = time.perf_counter()
    module = wrap(bundle, artifact.component).module
    programs, linears = int4_programs(module, method_feeds(artifact), artifact.component)
    return _write(module, artifact, programs, out, start,
                  {"quantized_ops": [str(torch.ops.aten.linear.default)], "int4_group": INT4_GROUP,
                   "quantized_linears": linears}, dynamic_partitioners())


@register_quantize_step
class ExecutorchQuantizeStep:
    """Target "executorch": the kinds ExecuTorch's XNNPACK backend runs."""

    target = "executorch"
    kinds = {"w8a8": _static_w8a8, "8da8w": _dynamic_8da8w, "8da4w": _dynamic_8da4w}

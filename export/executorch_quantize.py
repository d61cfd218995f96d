"""ExecuTorch's quantize step: PT2E static int8 through ExecuTorch's XNNPACKQuantizer, lowered to XNNPACK.

- **w8a8**: `XNNPACKQuantizer` with `get_symmetric_quantization_config(is_per_channel=True)` (int8
  weights symmetric per output channel, int8 activations with static ranges from its observers) on the
  convolutions and linear layers, torchao's `prepare_pt2e` / `convert_pt2e` around a calibration pass over
  every recorded U-Net call of the sampler, then pocketdiff's XNNPACK lowering (`export.executorch`: norm
  rewrites, explicit attention, one method per exported shape) with the partitioner taking quantized
  and float nodes alike.
The spec's float modules (conv_in, conv_out, the timestep embedding) and the norm rewrites are left out
of the annotation; attention's batched matmuls are never annotated, so softmax·V stays float. The .pte
is lowered again from the Bundle's module (a lowered program cannot be quantized) and replaces the float
one; each method's count of ops left outside the delegate is recorded beside its op table.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bundle import Bundle
from ..compress.quantize.calibration import CalibrationSet
from ..compress.quantize.spec import KEEP_FLOAT_MODULES, QuantSpec
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
                      calibration: CalibrationSet) -> tuple[dict[str, Any], int]:
    """Per method: torch.export, PT2E prepare with the static quantizer, `calibrate` over the recorded calls
    at that method's batch, convert, and export again for lowering; returns the programs and the calls per method."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared, _ = prepare(module)
    programs, calls = {}, 0
    with attention_form(prepared, ATTENTION_FORM):
        for method, ep in export_programs(prepared, inputs, component).items():
            observed = prepare_pt2e(ep.module(), static_quantizer())
            calls = calibrate(observed, batches(calibration, inputs[method]))
            converted = convert_pt2e(observed)
            programs[method] = export_programs(converted, {method: inputs[method]}, component)[method]
    return programs, calls


def _static_w8a8(bundle: Bundle, artifact: Artifact, spec: QuantSpec, calibration: CalibrationSet | None,
                 out: Path) -> dict[str, Any]:
    """Static int8 convolutions and linears, ranges observed over `calibration`, lowered to XNNPACK."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if calibration is None or artifact.component != "unet":
        raise ConfigError(f"static int8 activations need the U-Net's calibration set; {artifact.component} "
                          "has none (give it a weight-only kind)")
    if artifact.details.get("delegate", "XnnpackBackend") != "XnnpackBackend":
        raise ConfigError("ExecuTorch int8 runs through XNNPACK; drop --executorch-delegate")
    start = time.perf_counter()
    module = wrap(bundle, artifact.component).module
    programs, calls = quantize_programs(module, method_feeds(artifact), artifact.component, calibration)
    data, ops = lower(programs, artifact.component, [XnnpackPartitioner()])
    path = out / artifact.path
    atomic_write_bytes(path, data)
    weights = sum(t.numel() for t in module.state_dict().values() if t.is_floating_point())
    return {"bytes": path.stat().st_size, "ops": ops, "ops_outside_delegate": outside_delegate(ops),
            "quantize_seconds": round(time.perf_counter() - start, 2),
            "quantization": {"bits_per_weight": 8 * path.stat().st_size / max(weights, 1),
                             "quantized_ops": [str(op) for op in QUANTIZED_OPS], "calibration_calls": calls,
                             "float_modules": list(KEEP_FLOAT_MODULES)}}


@register_quantize_step
class ExecutorchQuantizeStep:
    """Target "executorch": the kinds ExecuTorch's XNNPACK backend runs."""

    target = "executorch"
    kinds = {"w8a8": _static_w8a8}

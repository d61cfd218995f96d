"""ExecuTorch exporter: one `.pte` per component, one method per exported shape, delegated to XNNPACK
(default, runs here) or to Core ML (`--executorch-delegate coreml`: lowers here, runs on Apple devices).

pocketdiff's lowering differs from a plain XNNPACK lowering in four ways; the first three put more of
the graph inside XNNPACK (every op left outside is a portable-kernel call and a delegate boundary),
the fourth does less arithmetic:
  * GroupNorm / LayerNorm are rewritten as reshape + mean + rsqrt (`rewrites/norms.py`: XNNPACK has no
    norm ops, so a plain lowering cuts the U-Net into dozens of delegate islands);
  * attention uses the explicit batched-matmul + softmax form (`rewrites/attention.py`: torch SDPA
    decomposes with NaN-guard ops XNNPACK does not take);
  * every (batch, resolution) is its own method with static shapes, because XNNPACK rejects
    symbolic reshapes; the methods share one copy of the weights (XNNPACK's named data store
    deduplicates identical tensors), so several shapes cost little extra file size.
  * 3x3 convolutions whose layer shape the measured XNNPACK table (`rewrites/winograd_table.py`) says is
    faster in Winograd form become `WinogradConv2d` (`rewrites/winograd_torch.py`; fp32; `--winograd f2|f4`
    forces it everywhere, `off` never).
Every lowering also keeps each XNNPACK delegate output in the layout the program records
(`delegate_outputs_keep_layout`: a correctness repair of ExecuTorch 1.5.1's channels-last pass on int8 graphs).
`plain_xnnpack_lowering` is the baseline for the latency comparison in bench/export_scale.py.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bundle import Bundle
from ..errors import ConfigError, UnsupportedOpError, UserError
from ..fileio import atomic_write_bytes
from .base import Artifact, ExportOptions, register_exporter
from .components import example_inputs, export_resolutions, locate_op, resolution_multiple, wrap
from .rewrites.attention import attention_form, attention_modules, choose_form
from .rewrites.norms import rewrite_norms
from .rewrites.winograd import conv_input_sizes, effective_mode
from .rewrites.winograd_torch import swap_winograd_modules

ATTENTION_FORM = choose_form("executorch")
PTE_DIR = "executorch"
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32"}
_DELEGATE = "executorch_call_delegate"


def method_name(feeds: dict[str, torch.Tensor]) -> str:
    """"b{batch}" plus "_{h}x{w}" of the first image-shaped input: the .pte method for these shapes."""
    first = next(iter(feeds.values()))
    name = f"b{first.shape[0]}"
    return name + (f"_{first.shape[2]}x{first.shape[3]}" if first.dim() == 4 else "")


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else "<top level>"


def _op_name(target: Any) -> str:
    name = getattr(target, "_name", None) or getattr(target, "__name__", None) or str(target)
    return name.replace("aten::", "aten.").replace("dim_order_ops::", "dim_order_ops.")


def _first_line(e: Exception) -> str:
    """The first non-empty line of an exception's message, shortened: the part worth showing a user."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _find_op(programs: dict[str, Any], text: str) -> tuple[str, str] | None:
    """The first (op, module path) of the exported graphs whose op name appears in `text`."""
    for ep in programs.values():
        for node in ep.graph.nodes:
            if node.op == "call_function":
                op = _op_name(node.target)
                short = op.split(".")[1] if op.count(".") >= 1 else op
                if op in text or f"aten::{short}" in text or f"aten.{short}" in text:
                    return op, _module_path(node)
    return None


def _missing_kernels(edge_programs: dict[str, Any]) -> list[tuple[str, str]]:
    """(op, module path) for every out-variant op left outside the delegates that the runtime has no kernel for."""
    from executorch.runtime import Runtime

    known = set(Runtime.get().operator_registry.operator_names)
    missing = []
    for ep in edge_programs.values():
        for node in ep.graph.nodes:
            if node.op != "call_function" or not hasattr(node.target, "_schema"):
                continue
            name = node.target._schema.name + ("." + node.target._schema.overload_name
                                              if node.target._schema.overload_name else "")
            if name.startswith(("aten::", "dim_order_ops::")) and name not in known:
                missing.append((name, _module_path(node)))
    return missing


def export_programs(module: nn.Module, inputs: dict[str, dict[str, torch.Tensor]],
                    component: str) -> dict[str, Any]:
    """torch.export of `module` once per method (static shapes); UnsupportedOpError names op and module."""
    programs = {}
    with torch.no_grad():
        for method, feeds in inputs.items():
            try:
                programs[method] = torch.export.export(module, (), kwargs=feeds, strict=False)
            except Exception as e:
                raise _unsupported(component, module, feeds, e) from e
    return programs


def _unsupported(component: str, module: nn.Module, feeds: dict[str, torch.Tensor], e: Exception) -> UserError:
    text = f"{type(e).__name__}: {e}"
    for token in text.replace("'", " ").replace('"', " ").split():
        if token.startswith(("aten.", "aten::")):
            op = token.rstrip(",.:)")
            path = locate_op(module, feeds, op) or "<unknown module>"
            return UnsupportedOpError(f"ExecuTorch cannot express op {op} in {component} module {path}: "
                                      f"{_first_line(e)}")
    return UnsupportedOpError(f"ExecuTorch export of {component} failed: {_first_line(e)}")


@contextmanager
def delegate_outputs_keep_layout() -> Iterator[None]:
    """XNNPACK's channels-last pass, made to hand every delegate output back in the layout the program records.

    ExecuTorch 1.5.1's `ChannelsLastTaggedReshapePass` re-converges broadcast binary ops after its main walk. When
    a dequantized value is both a delegate output (NCHW) and an operand of such an op (an int8 downsampler's
    output that is a U-Net skip and the identity residual of the next resnet), the NHWC copy it inserts for the op
    takes over every use of that value (`replace_all_uses_with`), the graph output's too, and nothing checks the
    output again: XNNPACK then returns NHWC into an NCHW tensor ("Attempted to resize a static tensor"). Here each
    output whose layout differs from the one it had before the pass gets a copy back to it, made by the pass's own
    insertion on a dequantize of the output's own, so the ops inside keep their inputs."""
    from executorch.backends.xnnpack._passes.channels_last_tagged_reshape_pass import ChannelsLastTaggedReshapePass
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant
    from executorch.exir.pass_base import PassResult

    layout_pass = ChannelsLastTaggedReshapePass
    original = layout_pass.call

    def call(self: Any, graph_module: torch.fx.GraphModule) -> Any:
        wanted = [layout_pass._is_nhwc_tensor(n.meta["val"]) for n in graph_module.graph.output_node().args[0]]
        graph_module = original(self, graph_module).graph_module
        out = graph_module.graph.output_node()
        wrong = [(n, nhwc) for n, nhwc in zip(out.args[0], wanted) if layout_pass.is_nhwc_node(n) != nhwc]
        if not wrong:
            return PassResult(graph_module, True)
        for node, nhwc in wrong:
            if is_dequant(node):  # the output gets a dequantize of its own: the pass's copy then rewires it alone
                with graph_module.graph.inserting_after(node):
                    own = graph_module.graph.create_node("call_function", node.target, node.args, node.kwargs)
                own.meta = {k: v for k, v in node.meta.items() if k != layout_pass.PARTNER_NODE}
                out.replace_input_with(node, own)
                node = own
            (self.input_to_nhwc if nhwc else self.input_to_nchw)(graph_module, node, out)
        graph_module.recompile()
        for node in graph_module.graph.nodes:
            node.meta.pop(layout_pass.PARTNER_NODE, None)
        return PassResult(super(layout_pass, self).call(graph_module).graph_module, True)

    layout_pass.call = call
    try:
        yield
    finally:
        layout_pass.call = original


def lower(programs: dict[str, Any], component: str, partitioners: list[Any]) -> tuple[bytes, dict[str, Any]]:
    """Lower exported programs (one per method) to one .pte; returns its bytes and per-method op counts."""
    from executorch.exir import to_edge_transform_and_lower

    try:
        with delegate_outputs_keep_layout():
            edge = to_edge_transform_and_lower(programs, partitioner=partitioners)
    except Exception as e:
        hit = _find_op(programs, str(e))
        where = f"op {hit[0]} in {component} module {hit[1]}" if hit else component
        raise UnsupportedOpError(f"ExecuTorch cannot lower {where}: {_first_line(e)}") from e
    edge_programs = {m: edge.exported_program(m) for m in programs}
    program = edge.to_executorch()
    missing = _missing_kernels({m: program.exported_program(m) for m in programs})
    if missing:
        op, path = missing[0]
        raise UnsupportedOpError(f"ExecuTorch has no kernel for op {op} (from {component} module {path}) and "
                                 "no delegate took it; replace that layer or leave executorch out of --targets")
    counts = {}
    for m, ep in edge_programs.items():
        ops = Counter(_op_name(n.target) for n in ep.graph.nodes if n.op == "call_function")
        counts[m] = {"delegates": ops.pop(_DELEGATE, 0),
                     "outside_delegates": {k: v for k, v in sorted(ops.items()) if k not in ("getitem", "alloc")}}
    return program.buffer, counts


def coreml_partitioners() -> list[Any]:
    """ExecuTorch's Core ML partitioner (the program compiles to an mlprogram inside the .pte; it runs
    only where ExecuTorch has its Core ML backend, i.e. on Apple platforms)."""
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    return [CoreMLPartitioner()]


def xnnpack_partitioners() -> list[Any]:
    """The XNNPACK partitioner for float graphs: its FP32 precision class takes fp32 and fp16 nodes alike
    (the graph's dtype decides; there is no separate FP16 class)."""
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return [XnnpackPartitioner(config_precisions=ConfigPrecisionType.FP32)]


# Delegate name -> (partitioners, the backend id a lowered program records).
DELEGATES: dict[str, tuple[Any, str]] = {"xnnpack": (xnnpack_partitioners, "XnnpackBackend"),
                                         "coreml": (coreml_partitioners, "CoreMLBackend")}


def delegate_of(options: ExportOptions) -> str:
    """The delegate asked for (`extra["executorch_delegate"]`, default xnnpack); ConfigError if unknown."""
    name = options.extra.get("executorch_delegate", "xnnpack")
    if name not in DELEGATES:
        raise ConfigError(f"unknown ExecuTorch delegate {name!r}; choose from {', '.join(DELEGATES)}")
    return name


def prepare(module: nn.Module, norm_statistics: str = "fp32") -> tuple[nn.Module, int]:
    """pocketdiff's rewrites for XNNPACK: norms in delegable form; returns the copy and the rewrite count."""
    return rewrite_norms(module, norm_statistics)


def pocketdiff_lowering(module: nn.Module, inputs: dict[str, dict[str, torch.Tensor]],
                        component: str = "module", delegate: str = "xnnpack",
                        winograd: str = "auto", norm_statistics: str = "fp32") -> tuple[bytes, dict[str, Any]]:
    """pocketdiff's lowering of `module` (fp32 or fp16, as its weights and inputs are) for the given
    per-method inputs, to the named delegate. 3x3 convolutions go to Winograd form where the XNNPACK
    table (measured in fp32, at the first method's shapes) says they win, or everywhere with "f2"/"f4".
    `norm_statistics` is how an fp16 graph normalises (`rewrites.norms.NORM_STATISTICS`); fp32 graphs are
    the same either way."""
    prepared, rewritten = prepare(module, norm_statistics)
    first = next(iter(inputs.values()))
    fp32 = all(t.dtype != torch.float16 for t in first.values())
    mode = effective_mode(winograd, fp32) if delegate == "xnnpack" else "off"
    wino = swap_winograd_modules(prepared, "executorch", mode, conv_input_sizes(prepared, first) if mode != "off" else {})
    with attention_form(prepared, ATTENTION_FORM):
        programs = export_programs(prepared, inputs, component)
    partitioners, backend = DELEGATES[delegate]
    data, counts = lower(programs, component, partitioners())
    return data, {"norms_rewritten": rewritten, "norm_statistics": "fp32" if fp32 else norm_statistics,
                  "attention_form": ATTENTION_FORM, "ops": counts, "delegate": backend, "winograd": wino}


def plain_xnnpack_lowering(module: nn.Module, feeds: dict[str, torch.Tensor]) -> bytes:
    """Baseline: torch.export then ExecuTorch's stock XNNPACK partitioner, nothing else (for latency comparisons)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        ep = torch.export.export(module, (), kwargs=feeds, strict=False)
    return to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def describe(feeds: dict[str, torch.Tensor], varying: dict[str, dict[int, str]]) -> dict[str, dict[str, Any]]:
    """Name -> {shape with dim names where methods differ, dtype}."""
    return {n: {"shape": [varying.get(n, {}).get(i, d) for i, d in enumerate(t.shape)], "dtype": _DTYPES[t.dtype]}
            for n, t in feeds.items()}


@register_exporter
class ExecutorchExporter:
    """Target "executorch": `executorch/<component>.pte`, XNNPACK- or Core ML-delegated, one method per shape."""

    target = "executorch"

    def export(self, bundle: Bundle, component: str, options: ExportOptions, out: Path) -> Artifact:
        start = time.perf_counter()
        delegate = delegate_of(options)
        spec = wrap(bundle, component)
        resolutions = export_resolutions(bundle, options.resolutions)
        dtype = torch.float16 if options.precision == "fp16" else torch.float32
        module = spec.module if dtype == torch.float32 else copy.deepcopy(spec.module).to(dtype)
        per_method: dict[str, dict[str, torch.Tensor]] = {}
        for b in options.batch_sizes:
            for r in (resolutions if component != "text_encoder" else resolutions[:1]):
                feeds = example_inputs(bundle, component, b, r, dtype=dtype)
                per_method.setdefault(method_name(feeds), feeds)
        data, details = pocketdiff_lowering(module, per_method, component, delegate,
                                            options.extra.get("winograd", "auto"),
                                            options.extra.get("fp16_norms", "fp32"))
        final = out / PTE_DIR / f"{component}.pte"
        atomic_write_bytes(final, data)
        with torch.no_grad():
            first = next(iter(per_method.values()))
            sample_out = module(**first)
        outputs = {spec.output_names[0]: {"shape": list(sample_out.shape), "dtype": _DTYPES[sample_out.dtype]}}
        shapes = [{n: list(t.shape) for n, t in feeds.items()} for feeds in per_method.values()]
        details.update({
            "methods": {m: {n: list(t.shape) for n, t in f.items()} for m, f in per_method.items()},
            "input_order": list(first), "output_order": spec.output_names,
            "attention_modules": len(attention_modules(module)),
            "bytes": final.stat().st_size,
            "resolution_multiple": resolution_multiple(bundle), "vae_scale_factor": bundle.vae_scale_factor,
            "export_seconds": round(time.perf_counter() - start, 2)})
        return Artifact(target=self.target, component=component, path=str(final.relative_to(out)),
                        precision=options.precision, inputs=describe(first, _varying(spec.dynamic_axes, shapes)),
                        outputs=outputs, shapes=shapes, details=details)


def _varying(axes: dict[str, dict[int, str]], shapes: list[dict[str, list[int]]]) -> dict[str, dict[int, str]]:
    """The dynamic axes whose size actually differs between the exported methods."""
    out: dict[str, dict[int, str]] = {}
    for name, dims in axes.items():
        for axis, label in dims.items():
            if name in shapes[0] and len({tuple(s[name])[axis] for s in shapes}) > 1:
                out.setdefault(name, {})[axis] = label
    return out

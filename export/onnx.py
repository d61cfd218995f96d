"""The ONNX exporter: optimum-style folders (onnx/unet/model.onnx + config.json), fp32 or fp16, fused attention.

The folder loads as it is in diffusers' OnnxStableDiffusionPipeline (graph interface and pipeline files:
`onnx_pipeline.py`) and carries manifest.json, README.md and generate.py, a numpy + onnxruntime +
tokenizers script that reproduces `pocketdiff generate` (`folder.py`, `onnx_example.py`).

Each component is traced from its `export.components` wrapper with dynamic batch and image axes,
attention emitted as onnxruntime's fused MultiHeadAttention, or in standard ops for other runtimes
(`ONNX_ATTENTION`, `rewrites/attention.py`), GEGLU feed-forward
layers as two projections (`rewrites/feedforward.py`), 3x3 convolutions rewritten to Winograd form where
the measured table says it wins (`rewrites/winograd_onnx.py`). fp16 graphs
keep fp32 islands: always the timestep embedding, and more (normalisations and attention, then the
whole graph) when a trial run shows NaN, Inf, a black image or a drift from the fp32 reference.
Weights go to one external-data file when the graph passes 2 GB.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..bundle import Bundle
from ..errors import ConfigError, GateError, UnsupportedOpError
from ..fileio import atomic_write_json
from .base import Artifact, ArtifactSet, ExportOptions, register_exporter
from .components import example_inputs, export_resolutions, locate_op, resolution_multiple, wrap
from .folder import folder_manifest, render_readme, sampling_settings, write_folder_docs
from .onnx_pipeline import DIFFUSERS_SCALING, adapt_interface, write_pipeline_files
from .rewrites.attention import attention_form, choose_form, intended_fused_count
from .rewrites.feedforward import split_geglu
from .rewrites.winograd import conv_input_sizes, effective_mode
from .rewrites.winograd_onnx import apply_winograd

OPSET = 18
PROTOBUF_LIMIT = 2 * 1024 ** 3
EXTERNAL_DATA = "model.onnx_data"
# fp32 islands tried in order for fp16 graphs until the trial run is clean.
NORM_AND_ATTENTION_OPS = ["InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax",
                          "MultiHeadAttention", "Attention", "ReduceMean", "Pow", "Sqrt", "Exp", "Erf"]
# Ops whose extra inputs must stay float32 (Resize scales) in every fp16 graph.
ALWAYS_FP32 = ["Resize"]
ISLAND_LADDER = ("timestep", "timestep+norm+attention", "all")
FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention")  # com.microsoft domain
FP16_MAX_REL_L2 = 0.05
# ONNX attention settings (`--onnx-attention`): the form each traces to, for the runtimes that run it.
ONNX_ATTENTION = {"ort_mha": "onnxruntime's contrib com.microsoft MultiHeadAttention (fused, the default)",
                  "softmax": "standard ONNX ops only (MatMul, Softmax) for runtimes without onnxruntime's contrib ops"}
EXAMPLE_SCRIPT = "generate.py"
LOADING = """## Loading
- diffusers: `OnnxStableDiffusionPipeline.from_pretrained(this_folder, provider="CPUExecutionProvider")`{missing};
  pass `latents=` (the starting noise above) to reproduce pocketdiff's image for a seed. It sizes latents as
  height // 8: for this model's {native}-pixel images pass `height={side}, width={side}`. (diffusers 0.42 prints
  "EP Error ... Falling back to ['CPUExecutionProvider']" for each graph, then runs on that provider.)
- optimum: `ORTStableDiffusionPipeline` reads the same layout and casts inputs to the graphs' dtypes (not tested
  by pocketdiff, whose pinned transformers 5 optimum-onnx does not accept).
- Plain onnxruntime: `python generate.py --prompt "..." --noise noise.npy --out image.png` (numpy, onnxruntime
  and tokenizers only; it reads everything from manifest.json).
- Graphs with attention `ort_mha` use onnxruntime's contrib `com.microsoft` MultiHeadAttention; export with
  `--onnx-attention softmax` for other ONNX runtimes (standard ops only).
"""
MISSING_ENCODER = " with `vae_encoder=None` (this folder has no VAE encoder)"
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
           onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


def graph_config(bundle: Bundle, component: str, interface: dict[str, Any]) -> dict[str, Any]:
    """The diffusers/transformers config of the module a component comes from, as plain JSON; a VAE graph
    rescaled to the diffusers ONNX latent convention says so in its `scaling_factor` (what optimum divides by)."""
    module = bundle.text_encoder if component == "text_encoder" else (
        bundle.unet if component == "unet" else bundle.vae)
    cfg = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    if "latent_rescale" in interface:
        cfg["scaling_factor"] = DIFFUSERS_SCALING
    return json.loads(json.dumps(cfg, default=str))


def attention_setting(options: ExportOptions) -> str:
    """The attention form of the ONNX graphs: `extra["onnx_attention"]`, one of `ONNX_ATTENTION` (default ort_mha)."""
    form = options.extra.get("onnx_attention") or choose_form("onnx")
    if form not in ONNX_ATTENTION:
        raise ConfigError(f"unknown ONNX attention {form!r}; choose {' or '.join(ONNX_ATTENTION)} "
                          f"({'; '.join(f'{k}: {v}' for k, v in ONNX_ATTENTION.items())})")
    return form


def name_static_dims(model: onnx.ModelProto, spec: Any, feeds: dict[str, torch.Tensor]) -> None:
    """Give output dims the exporter named after ops ("LayerNormalizationlast_hidden_state_dim_1") their fixed
    size, from one PyTorch run: only the dynamic axes stay symbolic."""
    with torch.no_grad():
        out = spec.module(**feeds)
    dynamic = {d for axes in spec.dynamic_axes.values() for d in axes.values()}
    for value in model.graph.output:
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and dim.dim_param not in dynamic:
                dim.dim_value = int(out.shape[i])


def drop_unused_domains(model: onnx.ModelProto) -> None:
    """Remove opset imports no node uses (a standard-op graph then declares no com.microsoft domain)."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def trace_to_onnx(module: torch.nn.Module, feeds: dict[str, torch.Tensor], input_names: list[str],
                  output_names: list[str], dynamic_axes: dict[str, dict[int, str]] | None, path: Path) -> None:
    """torch.onnx.export (TorchScript path, opset 18, com.microsoft ops allowed); names unsupported ops."""
    try:
        with torch.no_grad():
            torch.onnx.export(module, tuple(feeds[n] for n in input_names), str(path), input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, opset_version=OPSET,
                              custom_opsets={"com.microsoft": 1}, do_constant_folding=True, dynamo=False)
    except torch.onnx.errors.OnnxExporterError as e:
        raise _unsupported(module, feeds, e) from e
    except RuntimeError as e:
        if "Unsupported" in str(e) or "not supported" in str(e) or "Exporting the operator" in str(e):
            raise _unsupported(module, feeds, e) from e
        raise


def _unsupported(module: torch.nn.Module, feeds: dict[str, torch.Tensor], e: Exception) -> UnsupportedOpError:
    text = str(e)
    match = re.search(r"operator '?([\w:.]+)'?", text) or re.search(r"(aten::\w+)", text)
    op = match.group(1) if match else "unknown op"
    where = locate_op(module, feeds, op) if match else None
    first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
    return UnsupportedOpError(f"ONNX opset {OPSET} cannot express {op}"
                              f"{f' (in module {where})' if where else ''}: {first}; "
                              "replace that layer or export to another target")


def count_onnx_fused(model: onnx.ModelProto | str | Path) -> int:
    """Fused attention nodes (com.microsoft Attention / MultiHeadAttention) in an ONNX model or file."""
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    return sum(1 for n in model.graph.node if n.op_type in FUSED_ATTENTION_OPS and n.domain == "com.microsoft")


def node_scope(name: str) -> str:
    """Module path of a TorchScript-exported node name: "/unet/conv_in/Conv" -> "unet.conv_in"."""
    return ".".join(name.strip("/").split("/")[:-1])


def scope_index(paths: Any) -> dict[str, str]:
    """Node scope -> module path, also by suffix: a wrapper that calls `vae.decode` (not `vae(...)`)
    yields node scopes without the "vae." prefix."""
    index: dict[str, str] = {}
    ambiguous: set[str] = set()
    for path in paths:
        parts = path.split(".")
        for i in range(1, len(parts)):
            suffix = ".".join(parts[i:])
            if suffix in index and index[suffix] != path:
                ambiguous.add(suffix)
            index.setdefault(suffix, path)
    for suffix in ambiguous:
        index.pop(suffix, None)
    return {**index, **{p: p for p in paths}}


def conv_node_sizes(model: onnx.ModelProto, sizes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Conv node name -> input (height, width), from module path -> size (`conv_input_sizes`) by node scope."""
    scopes = scope_index(sizes)
    return {n.name: sizes[scopes[node_scope(n.name)]] for n in model.graph.node
            if n.op_type == "Conv" and node_scope(n.name) in scopes}


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all weights (raw or external), to decide on the external-data format."""
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def save_model(model: onnx.ModelProto, path: Path) -> bool:
    """Write `model` to `path`, weights in one `model.onnx_data` beside it past 2 GB; returns whether external."""
    external = initializer_bytes(model) > PROTOBUF_LIMIT - (64 << 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=1024)
    return external


def _ancestors(model: onnx.ModelProto, seeds: list[onnx.NodeProto]) -> set[str]:
    producer = {o: n for n in model.graph.node for o in n.output}
    seen: set[str] = set()
    stack = list(seeds)
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return seen


def fp32_island(model: onnx.ModelProto, rung: str) -> tuple[list[str], list[str]]:
    """(op types, node names) kept in fp32 for an island rung of `ISLAND_LADDER`."""
    time_nodes = [n for n in model.graph.node if "/time_proj/" in n.name]
    names = sorted(_ancestors(model, time_nodes))
    if rung == "timestep":
        return [], names
    if rung == "timestep+norm+attention":
        return NORM_AND_ATTENTION_OPS, names
    return sorted({n.op_type for n in model.graph.node}), names


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn tensor-valued Constant nodes into initializers, so the fp16 converter sees who consumes them."""
    keep = []
    for node in model.graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is not None and attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def with_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Attach inferred types of every intermediate tensor (the fp16 converter casts at island borders by them).

    Shape inference runs on a weightless skeleton (so 2 GB+ graphs work); com.microsoft attention
    outputs, which onnx cannot infer, take their query's type and inference is run again past them.
    """
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for t in skeleton.graph.initializer:
        if t.raw_data and len(t.raw_data) > 4096:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.DEFAULT
            t.float_data.extend([])
    del skeleton.graph.value_info[:]
    for _ in range(2):
        skeleton = onnx.shape_inference.infer_shapes(skeleton)
        known = {v.name: v for v in skeleton.graph.value_info} | {v.name: v for v in skeleton.graph.input}
        for node in skeleton.graph.node:
            if node.domain == "com.microsoft" and node.output[0] not in known and node.input[0] in known:
                info = onnx.ValueInfoProto()
                info.CopyFrom(known[node.input[0]])
                info.name = node.output[0]
                skeleton.graph.value_info.append(info)
    del model.graph.value_info[:]
    model.graph.value_info.extend(skeleton.graph.value_info)
    return model


def fp16_io_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp32 graph behind fp16 float inputs/outputs (timestep stays fp32): the last-resort island."""
    graph = model.graph
    casts_in, renames = [], {}
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and inp.name != "timestep":
            inner = f"{inp.name}_fp32"
            renames[inp.name] = inner
            casts_in.append(onnx.helper.make_node("Cast", [inp.name], [inner], to=onnx.TensorProto.FLOAT,
                                                  name=f"{inp.name}_to_fp32"))
            inp.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    casts_out = []
    for out in graph.output:
        if out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            inner = f"{out.name}_fp32"
            for node in graph.node:
                for i, name in enumerate(node.output):
                    if name == out.name:
                        node.output[i] = inner
                for i, name in enumerate(node.input):
                    if name == out.name:
                        node.input[i] = inner
            casts_out.append(onnx.helper.make_node("Cast", [inner], [out.name], to=onnx.TensorProto.FLOAT16,
                                                   name=f"{out.name}_to_fp16"))
            out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def to_fp16(model: onnx.ModelProto, rung: str) -> onnx.ModelProto:
    """fp16 copy of an fp32 graph with the given fp32 island; fp16 float I/O except the timestep."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    if rung == "all":
        return fp16_io_only(copy.deepcopy(model))
    model = with_value_info(constants_to_initializers(copy.deepcopy(model)))
    ops, nodes = fp32_island(model, rung)
    keep = [i.name for i in model.graph.input if i.name == "timestep"]
    model = convert_float_to_float16(model, keep_io_types=keep or False,
                                     op_block_list=DEFAULT_OP_BLOCK_LIST + ALWAYS_FP32 + ops,
                                     node_block_list=nodes, disable_shape_infer=True)
    return topological_sort(model)


def topological_sort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reorder nodes so each comes after the producers of its inputs (the fp16 converter appends Casts)."""
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending = list(model.graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a dangling input at node {rest[0].name}")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def run_onnx(model_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One onnxruntime CPU run of a saved model (used for the fp16 trial)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    cast = {k: v.astype(np.float16) if types[k] == "tensor(float16)" else v for k, v in feeds.items()}
    return sess.run(None, cast)


def fp16_trouble(reference: np.ndarray, candidate: np.ndarray) -> str | None:
    """Why an fp16 output must not ship (NaN/Inf, black/constant, drift), or None when it is fine."""
    cand = candidate.astype(np.float64)
    if not np.isfinite(cand).all():
        return "NaN or Inf in the output"
    ref = reference.astype(np.float64)
    if cand.std() < 1e-3 * max(ref.std(), 1e-12):
        return "constant (black) output"
    rel = np.linalg.norm(ref - cand) / max(np.linalg.norm(ref), 1e-30)
    if rel > FP16_MAX_REL_L2:
        return f"relative L2 error {rel:.3g} against fp32 (limit {FP16_MAX_REL_L2})"
    return None


def io_description(model: onnx.ModelProto) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Name -> {shape (ints or dim names), dtype} for the graph's inputs and outputs."""
    def describe(values: Any) -> dict[str, dict[str, Any]]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out[v.name] = {"shape": shape, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type))}
        return out
    return describe(model.graph.input), describe(model.graph.output)


@register_exporter
class OnnxExporter:
    """Target "onnx": one `<component>/model.onnx` per component under `onnx/`."""

    target = "onnx"

    def export(self, bundle: Bundle, component: str, options: ExportOptions, out: Path) -> Artifact:
        """Trace, rewrite (attention, Winograd, fp16 islands), save and describe one component."""
        start = time.perf_counter()
        spec = wrap(bundle, component)
        resolutions = export_resolutions(bundle, options.resolutions)
        feeds = example_inputs(bundle, component, options.batch_sizes[0], resolutions[0])
        form = attention_setting(options)
        final = out / "onnx" / component / "model.onnx"
        out.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="onnx-", dir=out))
        try:
            used: set[str] = set()
            with attention_form(spec.module, form, used), split_geglu(spec.module):
                trace_to_onnx(spec.module, feeds, spec.input_names, spec.output_names, spec.dynamic_axes,
                              scratch / "model.onnx")
            model = onnx.load(str(scratch / "model.onnx"))
            details: dict[str, Any] = {"opset": OPSET, "attention_form": form,
                                       "winograd": self._winograd(model, spec.module, feeds, options)}
            if options.precision == "fp16":
                model, details["fp32_islands"], details["fp16_trial"] = self._fp16(
                    model, spec, feeds, scratch, component)
            details["interface"] = adapt_interface(model, bundle, component)
            name_static_dims(model, spec, feeds)
            drop_unused_domains(model)
            external = save_model(model, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        onnx.checker.check_model(str(final))
        atomic_write_json(final.parent / "config.json", graph_config(bundle, component, details["interface"]))
        inputs, outputs = io_description(model)
        shapes = [{n: list(t.shape) for n, t in example_inputs(bundle, component, b, r).items()}
                  for b in options.batch_sizes for r in resolutions]
        fused = count_onnx_fused(final)
        details.update({
            "fused_attention": fused, "fused_attention_intended": intended_fused_count(used, form),
            "external_data": external, "bytes": sum(p.stat().st_size for p in final.parent.iterdir()),
            "resolution_multiple": resolution_multiple(bundle), "vae_scale_factor": bundle.vae_scale_factor,
            "export_seconds": round(time.perf_counter() - start, 2)})
        return Artifact(target=self.target, component=component, path=str(final.relative_to(out)),
                        precision=options.precision, inputs=inputs, outputs=outputs, shapes=shapes, details=details)

    def finish_folder(self, bundle: Bundle, aset: ArtifactSet, out: Path) -> None:
        """Pipeline files, manifest.json, README.md and the example script generate.py in `out/onnx`."""
        import onnxruntime

        root = out / "onnx"
        components = [a.component for a in aset.artifacts if a.target == self.target]
        config, _ = sampling_settings(bundle)
        scheduler, tokenizer = write_pipeline_files(bundle, root, components, config.scheduler)
        manifest = folder_manifest(bundle, aset, self.target, "onnx", scheduler, tokenizer, DIFFUSERS_SCALING,
                                   {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                                    "opset": str(OPSET)})
        side = bundle.resolution // bundle.vae_scale_factor * 8  # the pipeline sizes latents as height // 8
        loading = LOADING.format(missing="" if "vae_encoder" in components else MISSING_ENCODER, side=side,
                                 native=bundle.resolution)
        write_folder_docs(root, manifest, render_readme(manifest, loading),
                          {EXAMPLE_SCRIPT: (Path(__file__).parent / "onnx_example.py").read_bytes()})

    def _winograd(self, model: onnx.ModelProto, module: torch.nn.Module, feeds: dict[str, torch.Tensor],
                  options: ExportOptions) -> dict[str, Any]:
        """Winograd-rewrite the 3x3 convolutions the measured table says are faster on onnxruntime.

        The table was measured in fp32, so "auto" leaves fp16 graphs alone; "f2"/"f4" force it.
        """
        mode = options.extra.get("winograd", "auto")
        if effective_mode(mode, options.precision == "fp32") == "off" and mode != "off":
            return {"mode": mode, "rewritten": {}, "eligible": 0, "note": "table measured for fp32 only"}
        return apply_winograd(model, "onnx", mode, conv_node_sizes(model, conv_input_sizes(module, feeds)))

    def _fp16(self, model: onnx.ModelProto, spec: Any, feeds: dict[str, torch.Tensor], scratch: Path,
              component: str) -> tuple[onnx.ModelProto, str, dict[str, Any]]:
        """The fp16 graph with the smallest fp32 island whose trial output is clean."""
        with torch.no_grad():
            reference = spec.module(**feeds).numpy()
        np_feeds = {k: v.numpy() for k, v in feeds.items()}
        problems = {}
        for rung in ISLAND_LADDER:
            candidate = to_fp16(model, rung)
            trial = scratch / f"trial-{rung.replace('+', '_')}" / "model.onnx"
            save_model(candidate, trial)
            out = run_onnx(trial, np_feeds)[0]
            trouble = fp16_trouble(reference, out)
            if trouble is None:
                label = "none" if rung == "timestep" and not fp32_island(model, rung)[1] else rung
                rel = float(np.linalg.norm(reference - out.astype(np.float64)) / max(np.linalg.norm(reference), 1e-30))
                return candidate, label, {"rel_l2": rel, "rejected": problems}
            problems[rung] = trouble
        raise GateError(f"fp16 {component}: every fp32-island choice gave a bad trial output ({problems}); "
                        "not shipping it: export with --precision fp32")

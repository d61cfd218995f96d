"""The ONNX folder as diffusers' `OnnxStableDiffusionPipeline` loads it: graph interface and pipeline files.

That pipeline (and optimum's ORTStableDiffusionPipeline, which casts to the graph's dtypes) feeds:
    text_encoder  input_ids int32 only: an encoder that takes a mask derives it inside the graph
                  (attention_mask = input_ids != the tokenizer's pad id, exactly what the tokenizer returns)
    unet          timestep [1] for the whole batch (or one per sample): rank 1, broadcast in the graph
    vae_decoder   latents / 0.18215, a constant it does not read from the model: a VAE with another
                  scaling factor s gets a Mul by 0.18215 / s at its decoder's input (and by s / 0.18215
                  at its encoder's output), recorded as `latent_rescale` = s / 0.18215 in the artifact
The pipeline files: model_index.json naming every component (absent ones as [null, null]),
tokenizer/ with the vocabulary files its slow class reads too, scheduler/ with the scheduler
pocketdiff samples this model with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..bundle import Bundle
from ..fileio import atomic_write_bytes, atomic_write_json
from ..schedulers import make_scheduler
from .base import COMPONENT_NAMES

DIFFUSERS_SCALING = 0.18215  # OnnxStableDiffusionPipeline decodes `1 / 0.18215 * latents`, whatever the model
PIPELINE_CLASS = "OnnxStableDiffusionPipeline"


def adapt_interface(model: onnx.ModelProto, bundle: Bundle, component: str) -> dict[str, Any]:
    """Rewrite a traced graph's inputs/outputs in place to the diffusers ONNX pipeline's interface; what changed."""
    graph = model.graph
    changes: dict[str, Any] = {}
    if component == "text_encoder":
        pad = pad_token_id(bundle)
        if pad is not None and any(i.name == "attention_mask" for i in graph.input):
            _derive_mask(graph, pad)
            changes["attention_mask"] = f"derived in the graph: input_ids != {pad}"
        for inp in graph.input:
            if inp.type.tensor_type.elem_type == TensorProto.INT64:
                _cast_input(graph, inp, TensorProto.INT32)
                changes.setdefault("int32_inputs", []).append(inp.name)
    if component == "unet":
        for inp in graph.input:
            if inp.name == "timestep":
                inp.type.tensor_type.shape.dim[0].dim_param = "timestep_batch"
        changes["timestep"] = "[1] (one for the batch) or [batch]"
    rescale = latent_rescale(bundle)
    if component in ("vae_decoder", "vae_encoder") and not math.isclose(rescale, 1.0, rel_tol=1e-6):
        if component == "vae_decoder":
            _scale_input(graph, graph.input[0], 1.0 / rescale)
        else:
            _scale_output(graph, graph.output[0], rescale)
        changes["latent_rescale"] = rescale
    return changes


def latent_rescale(bundle: Bundle) -> float:
    """s / 0.18215 for the VAE's scaling factor s: the decoder graph takes pocketdiff's latents / s times this."""
    return float(bundle.vae.config.scaling_factor) / DIFFUSERS_SCALING


def pad_token_id(bundle: Bundle) -> int | None:
    """The tokenizer's pad id, when there is a tokenizer that pads (the mask is then input_ids != it)."""
    tok = bundle.tokenizer
    return None if tok is None or tok.pad_token_id is None else int(tok.pad_token_id)


def _cast_input(graph: onnx.GraphProto, inp: onnx.ValueInfoProto, dtype: int) -> None:
    """Make `inp` of `dtype`, with a Cast back to its traced type feeding the nodes that read it."""
    inner = f"{inp.name}_traced"
    _rename_uses(graph, inp.name, inner)
    graph.node.insert(0, helper.make_node("Cast", [inp.name], [inner], to=inp.type.tensor_type.elem_type,
                                          name=f"{inp.name}_cast"))
    inp.type.tensor_type.elem_type = dtype


def _derive_mask(graph: onnx.GraphProto, pad: int) -> None:
    """Drop the attention_mask input; compute it as int64(input_ids != pad) from the traced input_ids."""
    mask = next(i for i in graph.input if i.name == "attention_mask")
    ids = next(i for i in graph.input if i.name == "input_ids")
    pad_name = "attention_mask_pad_id"
    graph.initializer.append(numpy_helper.from_array(np.array(pad, dtype=np.int64), pad_name))
    nodes = [helper.make_node("Equal", [ids.name, pad_name], ["attention_mask_is_pad"], name="attention_mask_equal"),
             helper.make_node("Not", ["attention_mask_is_pad"], ["attention_mask_bool"], name="attention_mask_not"),
             helper.make_node("Cast", ["attention_mask_bool"], [mask.name], to=mask.type.tensor_type.elem_type,
                              name="attention_mask_cast")]
    graph.input.remove(mask)
    for node in reversed(nodes):
        graph.node.insert(0, node)


def _scale_input(graph: onnx.GraphProto, inp: onnx.ValueInfoProto, factor: float) -> None:
    """Multiply a float input by `factor` before any node reads it."""
    inner = f"{inp.name}_rescaled"
    _rename_uses(graph, inp.name, inner)
    const = f"{inp.name}_rescale"
    graph.initializer.append(_scalar(const, factor, inp.type.tensor_type.elem_type))
    graph.node.insert(0, helper.make_node("Mul", [inp.name, const], [inner], name=f"{inp.name}_rescale_mul"))


def _scale_output(graph: onnx.GraphProto, out: onnx.ValueInfoProto, factor: float) -> None:
    """Multiply a float output by `factor` after the node that makes it."""
    inner = f"{out.name}_unscaled"
    for node in graph.node:
        node.output[:] = [inner if o == out.name else o for o in node.output]
    _rename_uses(graph, out.name, inner)
    const = f"{out.name}_rescale"
    graph.initializer.append(_scalar(const, factor, out.type.tensor_type.elem_type))
    graph.node.append(helper.make_node("Mul", [inner, const], [out.name], name=f"{out.name}_rescale_mul"))


def _scalar(name: str, value: float, elem_type: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=helper.tensor_dtype_to_np_dtype(elem_type)), name)


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]


def write_pipeline_files(bundle: Bundle, root: Path, components: list[str],
                         scheduler_name: str) -> tuple[Any, dict[str, Any] | None]:
    """tokenizer/, scheduler/ and model_index.json in `root` (diffusers ONNX layout); the scheduler written and
    the tokenizer's description."""
    scheduler = make_scheduler(scheduler_name, bundle.scheduler.config)  # the one `pocketdiff generate` uses
    scheduler.save_pretrained(root / "scheduler")
    index: dict[str, Any] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": _diffusers_version(),
                             "safety_checker": [None, None], "feature_extractor": [None, None],
                             "requires_safety_checker": False, "tokenizer": [None, None],
                             "scheduler": ["diffusers", type(scheduler).__name__]}
    tokenizer = write_tokenizer(bundle, root / "tokenizer") if bundle.tokenizer is not None else None
    if tokenizer:
        index["tokenizer"] = ["transformers", tokenizer["class"]]
    for comp in COMPONENT_NAMES:
        index[comp] = ["diffusers", "OnnxRuntimeModel"] if comp in components else [None, None]
    atomic_write_json(root / "model_index.json", index)
    return scheduler, tokenizer


def write_tokenizer(bundle: Bundle, folder: Path) -> dict[str, Any]:
    """The tokenizer's files (tokenizer.json, its config, and the slow class's vocabulary files); its description."""
    import transformers

    tok = bundle.tokenizer
    tok.save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec["model"]
    if model["type"] == "WordPiece":
        ordered = sorted(model["vocab"].items(), key=lambda kv: kv[1])
        atomic_write_bytes(folder / "vocab.txt", "".join(f"{t}\n" for t, _ in ordered).encode())
    elif model["type"] == "BPE":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        atomic_write_json(folder / "vocab.json", model["vocab"])
        atomic_write_bytes(folder / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())
    name = type(tok).__name__
    fast = name if name.endswith("Fast") else f"{name}Fast"
    return {"class": fast if hasattr(transformers, fast) else name, "kind": model["type"],
            "files": sorted(p.name for p in folder.iterdir()), "max_length": int(tok.model_max_length),
            "pad_token": tok.pad_token, "pad_id": pad_token_id(bundle)}


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__

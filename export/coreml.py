"""Core ML exporter: mlprogram `.mlpackage`s laid out for Apple's Core ML Stable Diffusion Swift package.

Files (under `coreml/`): TextEncoder, Unet, VAEDecoder, VAEEncoder `.mlpackage` and the tokenizer
files beside them. I/O names and layouts are the Swift package's: the U-Net takes
encoder_hidden_states as [batch, D, 1, 77] and returns noise_pred; the decoder takes z and returns
image. The Artifact keeps pocketdiff's standard names (so the harness feeds every target alike) and
records the Core ML name and layout of each tensor in details["coreml_io"].

Shapes: iOS18 programs take enumerated shapes on every input (each batch x resolution); Core ML
before iOS18 allows enumerated shapes on one input only, so there the image input enumerates the
resolutions and the batch is fixed at the largest requested one (details["fixed_batch"]).
Attention: iOS18 gets Core ML's fused scaled_dot_product_attention (coremltools fuses torch SDPA
only when no explicit scale is passed, so the query is pre-scaled: `default_scale_sdpa`); iOS16/17 get
the split-einsum form; both chosen by `rewrites/attention.py`. Norms are traced in `rewrites/norms.py`'s form.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bundle import Bundle
from ..errors import ConfigError, UnsupportedOpError
from ..fileio import atomic_write_bytes, atomic_write_json
from .base import Artifact, ExportOptions, register_exporter
from .components import example_inputs, export_resolutions, locate_op, resolution_multiple, wrap
from .rewrites.attention import attention_form, choose_form, default_scale_sdpa, intended_fused_count
from .rewrites.norms import rewrite_norms

COREML_DIR = "coreml"
FUSED_ATTENTION_OPS = ("scaled_dot_product_attention",)
TARGETS = ("iOS16", "iOS17", "iOS18")
PACKAGE = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder", "vae_encoder": "VAEEncoder"}
# pocketdiff name -> (Core ML name, layout); "b77d_to_bd177" = [B, 77, D] given as [B, D, 1, 77].
IO_NAMES = {
    "text_encoder": {"input_ids": ("input_ids", "same"), "attention_mask": ("attention_mask", "same"),
                     "last_hidden_state": ("last_hidden_state", "same")},
    "unet": {"sample": ("sample", "same"), "timestep": ("timestep", "same"),
             "encoder_hidden_states": ("encoder_hidden_states", "b77d_to_bd177"), "out_sample": ("noise_pred", "same")},
    "vae_decoder": {"latent_sample": ("z", "same"), "sample": ("image", "same")},
    "vae_encoder": {"sample": ("image", "same"), "latent_sample": ("latent", "same")},
}


def deployment_target(options: ExportOptions) -> str:
    """The requested deployment target, normalised to "iOS16" / "iOS17" / "iOS18"."""
    raw = str(options.extra.get("deployment_target", "iOS18"))
    for t in TARGETS:
        if raw.lower() == t.lower():
            return t
    raise ConfigError(f"unknown Core ML deployment target {raw!r}; choose {', '.join(TARGETS)}")


class AppleLayout(nn.Module):
    """Takes inputs in the Swift package's layout, calls the standard wrapper with pocketdiff's."""

    def __init__(self, inner: nn.Module, names: list[str], layouts: dict[str, str]):
        super().__init__()
        self.inner, self.names, self.layouts = inner, names, layouts

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        feeds = {}
        for name, x in zip(self.names, args):
            if self.layouts.get(name) == "b77d_to_bd177":
                x = x.squeeze(2).transpose(1, 2)
            elif x.dtype == torch.int32:
                x = x.long()
            feeds[name] = x
        return self.inner(**feeds)


def to_apple(name: str, x: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor in pocketdiff's layout converted to the Core ML input layout."""
    if layout == "b77d_to_bd177":
        return x.transpose(1, 2).unsqueeze(2)
    return x.int() if x.dtype == torch.int64 else x


def op_counts(mlpackage: Path) -> dict[str, int]:
    """MIL op type -> count over every function of an ML Program (reads the spec only; works on Linux)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(mlpackage))
    counts: Counter[str] = Counter()

    def walk(block: Any) -> None:
        for op in block.operations:
            counts[op.type] += 1
            for b in op.blocks:
                walk(b)

    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            walk(block)
    return dict(sorted(counts.items()))


def count_coreml_fused(mlpackage: str | Path) -> int:
    """scaled_dot_product_attention ops in a Core ML ML Program (no model load, works on Linux)."""
    counts = op_counts(Path(mlpackage))
    return sum(counts.get(o, 0) for o in FUSED_ATTENTION_OPS)


def _unsupported(component: str, module: nn.Module, feeds: dict[str, torch.Tensor], e: Exception) -> UnsupportedOpError:
    text = str(e)
    m = re.search(r"op '([\w.:]+)'", text) or re.search(r"op ([\w.:]+) not implemented", text)
    if m:
        op = m.group(1)
        located = re.search(r"located at: '([^']+)'", text)
        path = (locate_op(module, feeds, op) or locate_op(module, feeds, op.removeprefix("special_"))
                or (located.group(1) if located else "<unknown module>"))
        return UnsupportedOpError(f"Core ML cannot express op {op} in {component} module {path}; "
                                  "replace that layer or leave coreml out of --targets")
    first = next((ln for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return UnsupportedOpError(f"Core ML conversion of {component} failed: {first[:300]}")


def write_tokenizer(bundle: Bundle, root: Path) -> list[str]:
    """Tokenizer files beside the packages: vocab.json + merges.txt for CLIP BPE (what the Swift package reads), else vocab.txt."""
    if bundle.tokenizer is None or any(root.glob("vocab*")):
        return sorted(p.name for p in root.iterdir() if not p.name.endswith(".mlpackage"))
    bundle.tokenizer.save_pretrained(root)
    vocab = bundle.tokenizer.get_vocab()
    atomic_write_json(root / "vocab.json", vocab)
    model = json.loads((root / "tokenizer.json").read_text()).get("model", {}) if (root / "tokenizer.json").is_file() else {}
    if model.get("merges"):
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        atomic_write_bytes(root / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())
    elif model.get("type") == "WordPiece":
        atomic_write_bytes(root / "vocab.txt", ("\n".join(sorted(vocab, key=vocab.get)) + "\n").encode())
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".mlpackage"))


def register_missing_torch_ops() -> None:
    """Teach coremltools' TorchScript frontend ops it lacks: `new_ones` (transformers' bidirectional
    mask builds `q_idx.new_ones((), dtype=torch.bool)`, so BERT-style encoders such as MiniLM need it)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op
    from coremltools.converters.mil.frontend.torch.utils import NUM_TO_NUMPY_DTYPE

    if "new_ones" in _TORCH_OPS_REGISTRY:
        return

    @register_torch_op
    def new_ones(context: Any, node: Any) -> None:
        inputs = _get_inputs(context, node)
        code = inputs[2].val if len(inputs) > 2 and inputs[2] is not None else None
        dtype = np.dtype(NUM_TO_NUMPY_DTYPE[int(code)]) if code is not None else np.dtype(np.float32)
        if dtype.kind in "iu":
            dtype = np.dtype(np.int32)  # Core ML's fill holds fp16, fp32, int32 or bool
        size = inputs[1]
        static = ([v.val for v in size] if isinstance(size, list) else size.val)
        if static is not None and all(v is not None for v in np.atleast_1d(static)):
            context.add(mb.const(val=np.ones(tuple(int(v) for v in np.atleast_1d(static)), dtype=dtype), name=node.name))
            return
        shape = mb.concat(values=size, axis=0) if isinstance(size, list) else size
        context.add(mb.fill(shape=shape, value=dtype.type(1), name=node.name))


@register_exporter
class CoremlExporter:
    """Target "coreml": `coreml/<Package>.mlpackage`, mlprogram, fp16 compute."""

    target = "coreml"

    def export(self, bundle: Bundle, component: str, options: ExportOptions, out: Path) -> Artifact:
        import coremltools as ct

        start = time.perf_counter()
        register_missing_torch_ops()
        target = deployment_target(options)
        spec = wrap(bundle, component)
        resolutions = export_resolutions(bundle, options.resolutions)
        fixed_batch = None if target == "iOS18" else max(options.batch_sizes)
        batches = list(options.batch_sizes) if fixed_batch is None else [fixed_batch]
        combos = [(b, r) for b in batches for r in (resolutions if component != "text_encoder" else resolutions[:1])]
        feeds = {c: example_inputs(bundle, component, *c) for c in combos}
        names = IO_NAMES[component]
        layouts = {n: names[n][1] for n in spec.input_names}
        prepared, _ = rewrite_norms(spec.module)
        apple = AppleLayout(prepared, spec.input_names, layouts).eval()
        first = feeds[combos[0]]
        trace_args = tuple(to_apple(n, first[n], layouts[n]) for n in spec.input_names)
        form = choose_form("coreml", target)
        used: set[str] = set()
        with attention_form(prepared, form, used, default_scale_sdpa if form == "sdpa" else None), torch.no_grad():
            traced = torch.jit.trace(apple, trace_args)
        ct_inputs = []
        for i, n in enumerate(spec.input_names):
            per_combo = [tuple(to_apple(n, feeds[c][n], layouts[n]).shape) for c in combos]
            # iOS18 pairs enumerated shapes by position across inputs; earlier targets take one input only
            shapes = per_combo if target == "iOS18" else list(dict.fromkeys(per_combo))
            enumerate_this = len(set(per_combo)) > 1 and (target == "iOS18" or i == 0)
            shape = ct.EnumeratedShapes(shapes=shapes, default=shapes[0]) if enumerate_this else shapes[0]
            dtype = np.int32 if first[n].dtype == torch.int64 else np.float32
            ct_inputs.append(ct.TensorType(name=names[n][0], shape=shape, dtype=dtype))
        out_name = names[spec.output_names[0]][0]
        try:
            model = ct.convert(traced, inputs=ct_inputs, outputs=[ct.TensorType(name=out_name, dtype=np.float32)],
                               convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                               minimum_deployment_target=getattr(ct.target, target), skip_model_load=True)
        except (NotImplementedError, ValueError, RuntimeError, TypeError) as e:
            raise _unsupported(component, spec.module, first, e) from e
        root = out / COREML_DIR
        final = root / f"{PACKAGE[component]}.mlpackage"
        root.mkdir(parents=True, exist_ok=True)
        model.save(str(final))
        files = write_tokenizer(bundle, root) if component == "text_encoder" else []
        ops = op_counts(final)
        with torch.no_grad():
            sample_out = spec.module(**first)
        shapes = [{n: list(f[n].shape) for n in spec.input_names} for f in feeds.values()]
        varying = {n: {a: lbl for a, lbl in spec.dynamic_axes.get(n, {}).items()
                       if len({s[n][a] for s in shapes}) > 1} for n in spec.input_names}
        inputs = {n: {"shape": [varying[n].get(a, d) for a, d in enumerate(first[n].shape)],
                      "dtype": "int64" if first[n].dtype == torch.int64 else "float32"} for n in spec.input_names}
        details = {
            "deployment_target": target, "compute_precision": "fp16", "attention_form": form,
            "attention_modules": len(used), "fused_attention": count_coreml_fused(final),
            "fused_attention_intended": intended_fused_count(used, form), "ops": ops,
            "coreml_io": {n: {"name": names[n][0], "layout": names[n][1]}
                          for n in spec.input_names + spec.output_names},
            "enumerated_inputs": [t.name for t in ct_inputs if isinstance(t.shape, ct.EnumeratedShapes)],
            "fixed_batch": fixed_batch, "tokenizer_files": files,
            "bytes": sum(p.stat().st_size for p in final.rglob("*") if p.is_file()),
            "resolution_multiple": resolution_multiple(bundle), "vae_scale_factor": bundle.vae_scale_factor,
            "export_seconds": round(time.perf_counter() - start, 2)}
        # Core ML computes in fp16 whatever --precision says (compute_precision above), so its artifacts
        # are fp16 artifacts and validate against the fp16 gate.
        return Artifact(target=self.target, component=component, path=str(final.relative_to(out)),
                        precision="fp16", inputs=inputs,
                        outputs={spec.output_names[0]: {"shape": list(sample_out.shape), "dtype": "float32"}},
                        shapes=shapes, details=details)

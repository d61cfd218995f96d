"""Per-component export wrappers: tensor-only modules with the standard (diffusers/optimum) I/O names.

Every exporter traces these same wrappers, so an ONNX, Core ML and ExecuTorch artifact of one
component take and return the same named tensors:

    text_encoder  input_ids [batch, 77] int64 (+ attention_mask [batch, 77] int64 when the encoder
                  uses one, as the built-in MiniLM does)            -> last_hidden_state [batch, 77, D]
    unet          sample [batch, C, h, w], timestep [batch] float32, encoder_hidden_states
                  [batch, 77, D] (+ text_embeds, time_ids for SDXL)  -> out_sample [batch, C, h, w]
    vae_decoder   latent_sample [batch, 4, h, w] (already divided by scaling_factor) -> sample [batch, 3, H, W]
    vae_encoder   sample [batch, 3, H, W] in [-1, 1]                  -> latent_sample [batch, 4, h, w]
                  (a KL VAE's distribution mean, not a random draw, so artifacts are deterministic;
                  an AutoencoderTiny's encoder gives its latents directly: `pocketdiff.vae`)

The timestep stays float32 at every precision: fp16 cannot hold 999 and sin(999) accurately
enough for the sinusoidal embedding, and Euler-type schedulers use fractional timesteps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..bundle import Bundle
from ..errors import ConfigError, ShapeError
from ..sampler import latent_shape
from ..vae import encode_latents
from .base import COMPONENT_NAMES

TEXT_TOKENS = 77
EXAMPLE_PROMPT = "a photo of a sneaker"


def uses_attention_mask(text_encoder: nn.Module) -> bool:
    """Whether the encoder is fed an attention mask (diffusers' own rule: config.use_attention_mask)."""
    return bool(getattr(text_encoder.config, "use_attention_mask", False))


class TextEncoderExport(nn.Module):
    """input_ids (+ attention_mask) -> last_hidden_state."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.with_mask = uses_attention_mask(text_encoder)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.text_encoder(input_ids, attention_mask=attention_mask if self.with_mask else None,
                                return_dict=False)
        return out[0]


class UNetExport(nn.Module):
    """sample, timestep, encoder_hidden_states (+ SDXL text_embeds, time_ids) -> out_sample."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.added_cond = unet.config.addition_embed_type == "text_time"

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.added_cond else None
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added, return_dict=False)[0]


class VaeDecoderExport(nn.Module):
    """latent_sample (unscaled by the caller: latents / scaling_factor) -> sample in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderExport(nn.Module):
    """sample in [-1, 1] -> latent_sample: a KL VAE's distribution mean, a tiny VAE's latents (deterministic)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return encode_latents(self.vae, sample)


@dataclass
class ComponentSpec:
    """A component ready to trace: the wrapper, its I/O names and which axes may vary."""

    component: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]  # tensor name -> {axis: symbolic dim name}


def wrap(bundle: Bundle, component: str) -> ComponentSpec:
    """The export wrapper of `component` with its standard names and dynamic axes."""
    if component not in COMPONENT_NAMES:
        raise ConfigError(f"unknown component {component!r}; choose from {', '.join(COMPONENT_NAMES)}")
    image_axes = {0: "batch", 2: "height", 3: "width"}
    if component == "text_encoder":
        if bundle.text_encoder is None:
            raise ConfigError("this model has no text encoder to export; leave text_encoder out of the components")
        mod = TextEncoderExport(bundle.text_encoder)
        inputs = ["input_ids"] + (["attention_mask"] if mod.with_mask else [])
        axes = {n: {0: "batch"} for n in inputs} | {"last_hidden_state": {0: "batch"}}
        return ComponentSpec(component, mod.eval(), inputs, ["last_hidden_state"], axes)
    if component == "unet":
        mod = UNetExport(bundle.unet)
        inputs = ["sample", "timestep", "encoder_hidden_states"] + (["text_embeds", "time_ids"] if mod.added_cond else [])
        axes = {"sample": image_axes, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
                "out_sample": image_axes} | {n: {0: "batch"} for n in inputs[3:]}
        return ComponentSpec(component, mod.eval(), inputs, ["out_sample"], axes)
    if component == "vae_decoder":
        return ComponentSpec(component, VaeDecoderExport(bundle.vae).eval(), ["latent_sample"], ["sample"],
                             {"latent_sample": image_axes, "sample": image_axes})
    return ComponentSpec(component, VaeEncoderExport(bundle.vae).eval(), ["sample"], ["latent_sample"],
                         {"sample": image_axes, "latent_sample": image_axes})


def resolution_multiple(bundle: Bundle) -> int:
    """Image sides must be multiples of this (VAE scale factor times the U-Net's downsampling)."""
    return bundle.vae_scale_factor * 2 ** (len(bundle.unet.config.down_block_types) - 1)


def check_resolution(bundle: Bundle, resolution: int) -> tuple[int, int]:
    """Latent (h, w) for a square image side; ShapeError if the model cannot take it."""
    return latent_shape(bundle, resolution, resolution)


def export_resolutions(bundle: Bundle, requested: tuple[int, ...]) -> list[int]:
    """The image sides to export for (`requested`, else the model's native one), each checked."""
    sides = list(requested) or [bundle.resolution]
    for side in sides:
        check_resolution(bundle, side)
    return sides


def example_inputs(bundle: Bundle, component: str, batch: int = 1, resolution: int | None = None,
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs of the right names, shapes and dtypes for one (batch, resolution, dtype)."""
    if batch < 1:
        raise ShapeError(f"batch must be at least 1, got {batch}")
    resolution = resolution or bundle.resolution
    h, w = check_resolution(bundle, resolution)
    g = torch.Generator().manual_seed(seed)
    if component == "text_encoder":
        return _text_inputs(bundle, batch)
    if component == "unet":
        cfg = bundle.unet.config
        ctx_dim = cfg.cross_attention_dim
        feeds = {"sample": torch.randn(batch, cfg.in_channels, h, w, generator=g).to(dtype),
                 "timestep": torch.full((batch,), 500.0),
                 "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, ctx_dim, generator=g).to(dtype)}
        if cfg.addition_embed_type == "text_time":
            emb = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            feeds["text_embeds"] = torch.randn(batch, emb, generator=g).to(dtype)
            feeds["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                             dtype=dtype)
        return feeds
    if component == "vae_decoder":
        c = bundle.vae.config.latent_channels
        return {"latent_sample": torch.randn(batch, c, h, w, generator=g).to(dtype)}
    if component == "vae_encoder":
        c = bundle.vae.config.in_channels
        return {"sample": (torch.rand(batch, c, resolution, resolution, generator=g) * 2 - 1).to(dtype)}
    raise ConfigError(f"unknown component {component!r}; choose from {', '.join(COMPONENT_NAMES)}")


def _text_inputs(bundle: Bundle, batch: int) -> dict[str, torch.Tensor]:
    if bundle.text_encoder is None:
        raise ConfigError("this model has no text encoder")
    if bundle.tokenizer is not None:
        tok = bundle.tokenizer([EXAMPLE_PROMPT] * batch, padding="max_length", max_length=TEXT_TOKENS,
                               truncation=True, return_tensors="pt")
        ids, mask = tok.input_ids.long(), tok.attention_mask.long()
    else:
        ids = torch.randint(0, bundle.text_encoder.config.vocab_size, (batch, TEXT_TOKENS),
                            generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
    feeds = {"input_ids": ids}
    if uses_attention_mask(bundle.text_encoder):
        feeds["attention_mask"] = mask
    return feeds


def torch_export_dynamic_shapes(bundle: Bundle, component: str, max_batch: int = 2,
                                max_resolution: int = 1024) -> dict[str, dict[int, Any]]:
    """`dynamic_shapes` for torch.export: dynamic batch, and image sides in steps the model accepts.

    Trace with an example batch of 2 or more: torch.export specialises a size-1 dimension to 1.
    """
    spec = wrap(bundle, component)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    mult = resolution_multiple(bundle)
    latent_step = mult // bundle.vae_scale_factor
    steps_h = torch.export.Dim("height_steps", min=1, max=max(1, max_resolution // mult))
    steps_w = torch.export.Dim("width_steps", min=1, max=max(1, max_resolution // mult))
    pixel = component == "vae_encoder"
    step = mult if pixel else latent_step
    dims: dict[str, dict[int, Any]] = {}
    for name in spec.input_names:
        axes = spec.dynamic_axes.get(name, {})
        dims[name] = {a: batch if d == "batch" else (step * steps_h if d == "height" else step * steps_w)
                      for a, d in axes.items()}
    return dims


class _OpRecorder(TorchDispatchMode):
    """Records, per aten op name, the module path that was running when it first ran."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack, self.first_seen = stack, {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        self.first_seen.setdefault(name, self.stack[-1] if self.stack else "")
        return func(*args, **(kwargs or {}))


def _pop(stack: list[str]) -> None:
    """Leave a module (returns None so the forward hook keeps the module's output)."""
    stack.pop()


@contextmanager
def _module_stack(module: nn.Module) -> Iterator[list[str]]:
    stack: list[str] = []
    handles = []
    for path, sub in module.named_modules():
        handles.append(sub.register_forward_pre_hook(lambda m, a, p=path: stack.append(p)))
        handles.append(sub.register_forward_hook(lambda m, a, o: _pop(stack)))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def locate_op(module: nn.Module, inputs: dict[str, torch.Tensor], op_name: str) -> str | None:
    """Path of the innermost module in which the aten op `op_name` first runs (None if it never does).

    Exporters use it to turn "op X is not supported" into "op X in down_blocks.0.attentions.0...".
    """
    op_name = op_name.split("::")[-1].split(".")[0]
    with _module_stack(module) as stack:
        rec = _OpRecorder(stack)
        with rec:
            module(**inputs)
    return rec.first_seen.get(op_name)

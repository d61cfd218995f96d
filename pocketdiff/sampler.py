"""The reference text-to-image sampler in PyTorch: classifier-free guidance, seeds, schedulers.

The loop talks to the model only through `Components` (encode text, predict noise, decode
latents), so the same loop runs the PyTorch reference and, through runtime adapters, an exported
artifact: the harness compares like with like.
"""

from __future__ import annotations

import inspect
import io
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from tqdm.auto import tqdm

from .bundle import Bundle
from .errors import ConfigError, ShapeError
from .guidance import student_condition, takes_guidance
from .fileio import atomic_write_bytes
from .schedulers import MAX_STEPS, check_steps, make_scheduler, scheduler_names


class Components(Protocol):
    """What the sampling loop needs from a model, whichever runtime computes it."""

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder states [N, 77, D] for the prompts."""
        ...

    def predict(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The U-Net's output for latents at timestep t under the text states `context` (fp32)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents (fp32)."""
        ...


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: torch.nn.Module, prompts: list[str],
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Token states [N, 77, D] as diffusers' StableDiffusionPipeline computes them."""
    tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    mask = tok.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]


class TorchComponents:
    """`Components` computed by the Bundle's own PyTorch modules. A guidance-conditioned student's
    U-Net is fed `guidance` as its embedded input (`generate` sets it from the guidance scale)."""

    guidance: float = 1.0

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if bundle.text_encoder is None or bundle.tokenizer is None:
            raise ConfigError("this model has no text encoder, so it cannot generate from prompts")
        self.bundle, self.device, self.dtype = bundle, torch.device(device), dtype

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.bundle.tokenizer, self.bundle.text_encoder, prompts, self.device).to(self.dtype)

    @torch.no_grad()
    def predict(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        unet = self.bundle.unet
        extra = student_condition(unet, self.guidance, latents.shape[0], self.device)
        return unet(latents.to(self.device, self.dtype), t.to(self.device),
                    encoder_hidden_states=context.to(self.device, self.dtype),
                    **{k: v.to(self.dtype) for k, v in extra.items()}).sample.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.bundle.vae
        return vae.decode(latents.to(self.device, self.dtype) / vae.config.scaling_factor).sample.float()


class CachedTextComponents(TorchComponents):
    """`TorchComponents` whose text states come from a precomputed prompt -> states table.

    For hosts without the text encoder's weights (the GPU host): the encoder is frozen, so its
    outputs for a known prompt set can be computed once elsewhere and carried.
    """

    def __init__(self, bundle: Bundle, table: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.bundle, self.table, self.device, self.dtype = bundle, table, torch.device(device), dtype

    def encode(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in prompts if p not in self.table]
        if missing:
            raise ConfigError(f"no cached text states for prompt {missing[0]!r}")
        return torch.stack([self.table[p] for p in prompts]).to(self.device, self.dtype)


MAX_SIDE = 4096  # pixels; past every supported model's size, so a larger ask is a typo, not a 40 GB tensor
MAX_SEED = 2**63 - 1  # seeds are int64 in torch.Generator.manual_seed
MAX_GUIDANCE = 100.0
_RANGES: dict[str, tuple[type, float, float | None]] = {
    "steps": (int, 1, MAX_STEPS), "guidance_scale": (float, 0.0, MAX_GUIDANCE), "seed": (int, 0, MAX_SEED),
    "height": (int, 1, MAX_SIDE), "width": (int, 1, MAX_SIDE), "batch_size": (int, 1, None)}


def check_sample_value(name: str, value: Any, label: str | None = None) -> Any:
    """`value` as SampleConfig field `name` takes it (ints widen to float); ConfigError naming `label`
    (default `name`) for a wrong type, NaN, an infinity or a value out of range."""
    label = label or name
    if name == "scheduler":
        if value not in scheduler_names():
            raise ConfigError(f"{label}: unknown scheduler {value!r}; choose one of {', '.join(scheduler_names())}")
        return value
    if name == "negative_prompt":
        if not isinstance(value, str):
            raise ConfigError(f"{label} must be a string, got {value!r}")
        return value
    if name in ("height", "width") and value is None:
        return None
    kind, lo, hi = _RANGES[name]
    wanted = numbers.Integral if kind is int else numbers.Real
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise ConfigError(f"{label} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not (lo <= value and (hi is None or value <= hi)):
        show = (lambda b: f"{int(b):,}") if kind is int else (lambda b: f"{b:g}")
        bound = f"between {show(lo)} and {show(hi)}" if hi is not None else f"at least {show(lo)}"
        raise ConfigError(f"{label} must be {bound}, got {value!r}")
    return kind(value)


@dataclass
class SampleConfig:
    """Everything that decides the images besides the model and the prompts; checked when made."""

    steps: int = 50
    scheduler: str = "ddim"
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    seed: int = 0
    height: int | None = None
    width: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """ConfigError naming the first field that is out of range (see `check_sample_value`)."""
        for f in fields(self):
            setattr(self, f.name, check_sample_value(f.name, getattr(self, f.name)))

    @classmethod
    def for_bundle(cls, bundle: Bundle, fallback: dict[str, Any] | None = None, **overrides: Any) -> SampleConfig:
        """`overrides` (None values ignored) over the Bundle's own sampling settings (a student's scheduler,
        steps, guidance) over `fallback` (a command's defaults) over the class defaults."""
        given = {k: v for k, v in overrides.items() if v is not None}
        values = {**(fallback or {}), **bundle.manifest.sampling, **given}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown sampling setting {unknown[0]!r} (the model's pocketdiff.json \"sampling\" "
                              f"or an override); settings: {', '.join(f.name for f in fields(cls))}")
        return cls(**values)


def latent_shape(bundle: Bundle, height: int | None, width: int | None) -> tuple[int, int]:
    """Latent height and width for an image size (None: native); ShapeError if the U-Net cannot take it."""
    f = bundle.vae_scale_factor
    height = bundle.resolution if height is None else height
    width = bundle.resolution if width is None else width
    multiple = f * 2 ** (len(bundle.unet.config.down_block_types) - 1)
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE) or height % multiple or width % multiple:
        raise ShapeError(f"{height}x{width} is not a size this model takes: height and width must be "
                         f"multiples of {multiple} between {multiple} and {MAX_SIDE} (native {bundle.resolution})")
    return height // f, width // f


def image_generators(n: int, seed: int, offset: int = 0) -> list[torch.Generator]:
    """One generator per image, seeded seed + offset + i: image i's noise never depends on the batching."""
    return [torch.Generator().manual_seed(seed + offset + i) for i in range(n)]


def initial_latents(n: int, channels: int, hw: tuple[int, int], seed: int, offset: int = 0,
                    generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Starting noise: image i of a run always gets seed + i, whatever the batching. Given `generators`
    (from `image_generators`), their streams continue into a stochastic scheduler's step noise, as a
    stock diffusers pipeline's generator does for one image."""
    gens = generators or image_generators(n, seed, offset)
    return torch.cat([torch.randn((1, channels, *hw), generator=g) for g in gens])


@torch.no_grad()
def sample_latents(components: Components, scheduler: Any, context: torch.Tensor, uncond: torch.Tensor | None,
                   latents: torch.Tensor, steps: int, guidance_scale: float,
                   generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Run the denoising loop from `latents`; returns final latents (before the VAE). Stochastic
    schedulers (LCM's multistep sampling) draw their noise from `generators`, one per image."""
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    guided = uncond is not None
    cond = torch.cat([uncond, context]) if guided else context
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = components.predict(model_in, t.expand(model_in.shape[0]), cond)
        if guided:
            pred_u, pred_c = pred.chunk(2)
            pred = pred_u + guidance_scale * (pred_c - pred_u)
        step_noise = {"generator": generators} if generators is not None and _takes_generator(scheduler) else {}
        latents = scheduler.step(pred, t, latents, **step_noise).prev_sample
    return latents


def _takes_generator(scheduler: Any) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def generate(bundle: Bundle, prompts: list[str], config: SampleConfig | None = None,
             components: Components | None = None, progress: bool = True) -> torch.Tensor:
    """Images for `prompts` as a float tensor [N, 3, H, W] in [0, 1]."""
    components = components or TorchComponents(bundle)
    return torch.cat([(components.decode(latents) / 2 + 0.5).clamp(0, 1).cpu()
                      for latents in latent_batches(bundle, prompts, config, components, progress)])


def latent_batches(bundle: Bundle, prompts: list[str], config: SampleConfig | None = None,
                   components: Components | None = None, progress: bool = True) -> Iterator[torch.Tensor]:
    """The final (scaled) latents for `prompts`, one batch of `config.batch_size` at a time, before the VAE:
    what `generate` decodes, and what a decoder trained or measured on sampled latents takes. The settings
    are checked when called, before the first batch is asked for."""
    config = config or SampleConfig()
    config.check()
    if not prompts:
        raise ConfigError("no prompts given")
    if config.seed + len(prompts) - 1 > MAX_SEED:
        raise ConfigError(f"seed {config.seed} is too large for {len(prompts)} images: image i draws seed + i, "
                          f"which must stay at most {MAX_SEED}")
    hw = latent_shape(bundle, config.height, config.width)
    scheduler = make_scheduler(config.scheduler, bundle.scheduler.config)
    check_steps(config.steps, scheduler, config.scheduler)
    components = components or TorchComponents(bundle)
    embeds = takes_guidance(bundle.unet)  # guidance is the student's input: one call per step, no CFG
    if embeds:
        components.guidance = config.guidance_scale
    guided = config.guidance_scale > 1.0 and not embeds
    return _batches(bundle, prompts, config, components, scheduler, hw, guided, progress)


def _batches(bundle: Bundle, prompts: list[str], config: SampleConfig, components: Components, scheduler: Any,
             hw: tuple[int, int], guided: bool, progress: bool) -> Iterator[torch.Tensor]:
    """`latent_batches`' sampling loop, apart so that its checks run when it is called, not when first iterated."""
    bar = tqdm(total=len(prompts), desc=f"{config.scheduler} x{config.steps}", unit="img", disable=not progress)
    for start in range(0, len(prompts), config.batch_size):
        chunk = prompts[start:start + config.batch_size]
        context = components.encode(chunk)
        uncond = components.encode([config.negative_prompt] * len(chunk)) if guided else None
        gens = image_generators(len(chunk), config.seed, start)
        latents = initial_latents(len(chunk), bundle.unet.config.in_channels, hw, config.seed, start, gens)
        latents = latents.to(getattr(components, "device", "cpu"))
        yield sample_latents(components, scheduler, context, uncond, latents, config.steps, config.guidance_scale,
                             gens)
        bar.update(len(chunk))
    bar.close()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] floats in [0, 1] to the uint8 [N, H, W, 3] a saved PNG holds (round half to even, like
    torchvision): the one rounding every saved or scored image goes through."""
    return (images.detach().permute(0, 2, 3, 1).cpu().float() * 255).round().clamp(0, 255).to(torch.uint8)


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] floats in [0, 1] exactly as they read back from the 8-bit PNGs `to_pil` saves."""
    return to_uint8(images).permute(0, 3, 1, 2).float() / 255


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] floats in [0, 1] to 8-bit PIL images (see `to_uint8`)."""
    return [Image.fromarray(a) for a in to_uint8(images).numpy()]


def save_pngs(images: torch.Tensor, folder: Path, seed: int) -> list[str]:
    """Write images [N, 3, H, W] in [0, 1] into `folder` as NNNN_seedS.png (image i drew seed + i); their names."""
    names = []
    for i, img in enumerate(to_pil(images)):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        names.append(f"{i:04d}_seed{seed + i}.png")
        atomic_write_bytes(Path(folder) / names[-1], buf.getvalue())
    return names

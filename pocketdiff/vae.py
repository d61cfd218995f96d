"""What pocketdiff asks of a Bundle's VAE, answered per diffusers VAE class in one table.

A Bundle's `vae` slot holds a KL autoencoder (`AutoencoderKL`: the teacher's, SD's) or, after the
light-decoder pass (`compress/slim/decoder.py`), an `AutoencoderTiny` (TAESD's layout). Both decode
with `vae.decode(latents / scaling_factor)`, but they differ in what `encode` returns (a latent
distribution vs the latents themselves) and in which modules make up the decoder. Costs, export,
evaluation and the training data ask those questions here instead of reading either class's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import diffusers
import torch
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class VaeAdapter:
    """One VAE class's answers: the modules of its decoder and whether its encoder is a distribution."""

    decoder_parts: tuple[str, ...]  # submodules `vae.decode` runs, in order
    gaussian: bool  # `encode` returns a latent distribution (else the latents themselves)


ADAPTERS: dict[type[nn.Module], VaeAdapter] = {
    diffusers.AutoencoderKL: VaeAdapter(("post_quant_conv", "decoder"), gaussian=True),
    diffusers.AutoencoderTiny: VaeAdapter(("decoder",), gaussian=False),
}


def adapter(vae: nn.Module) -> VaeAdapter:
    """The adapter of `vae`'s class; ConfigError naming the supported classes for any other VAE."""
    for cls, found in ADAPTERS.items():
        if isinstance(vae, cls):
            return found
    names = ", ".join(c.__name__ for c in ADAPTERS)
    raise ConfigError(f"this model's VAE is a {type(vae).__name__}; pocketdiff handles {names}")


def decoder_modules(vae: nn.Module) -> list[nn.Module]:
    """The modules `vae.decode` runs (their parameters are the decoder's)."""
    return [getattr(vae, part) for part in adapter(vae).decoder_parts]


def decoder_params(vae: nn.Module) -> int:
    """Parameter count of the decoder half."""
    return sum(p.numel() for m in decoder_modules(vae) for p in m.parameters())


def posterior(vae: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the latents of images in [-1, 1], before `scaling_factor`
    (a deterministic encoder's standard deviation is zero)."""
    out = vae.encode(images, return_dict=False)[0]
    return (out.mean, out.std) if adapter(vae).gaussian else (out, torch.zeros_like(out))


def encode_latents(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Deterministic latents of images in [-1, 1] (a distribution's mode), before `scaling_factor`."""
    out = vae.encode(images, return_dict=False)[0]
    return out.mode() if adapter(vae).gaussian else out

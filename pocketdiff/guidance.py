"""Guidance as a model input: the sinusoidal embedding a guidance-conditioned U-Net takes.

A distilled student with `time_cond_proj_dim` takes `timestep_cond = guidance_embedding(w - 1)` for
Imagen-style guidance scale w, exactly as diffusers' `LatentConsistencyModelPipeline` computes it,
so pocketdiff's sampler and the stock pipeline feed the student the same input.
"""

from __future__ import annotations

import math

import torch


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of guidance strengths `w` [N] (of w·1000)."""
    w = w.float() * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=w.device, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def takes_guidance(unet: torch.nn.Module) -> bool:
    """True for a guidance-conditioned U-Net (it embeds the guidance instead of running CFG)."""
    return unet.config.get("time_cond_proj_dim") is not None


def student_condition(unet: torch.nn.Module, guidance_scale: float, n: int, device: torch.device | str) -> dict:
    """The extra U-Net keyword a guidance-conditioned student needs (`timestep_cond`), else nothing."""
    if not takes_guidance(unet):
        return {}
    w = torch.full((n,), guidance_scale - 1.0, device=device)
    return {"timestep_cond": guidance_embedding(w, unet.config.time_cond_proj_dim)}

"""Students built from a U-Net: an added guidance input, its folding back out, EMA targets, and the
Bundle a consistency-sampled student ships as.

A guidance-conditioned student is the teacher's U-Net with diffusers' `time_cond_proj_dim`: a
linear map of the guidance embedding added to the timestep embedding. It is initialised at zero,
so the student starts as exactly the U-Net it came from. Folding a fixed guidance back into
`linear_1`'s bias gives a plain U-Net of the original config (same exporters, same diffusers
pipelines), with the chosen guidance baked in.
"""

from __future__ import annotations

import diffusers
import torch
from torch import nn

from ...bundle import Bundle
from ...errors import ConfigError
from ...guidance import guidance_embedding
from ...schedulers import make_scheduler

GUIDANCE_DIM = 256


def with_guidance_input(unet: diffusers.UNet2DConditionModel, dim: int = GUIDANCE_DIM) -> diffusers.UNet2DConditionModel:
    """A copy of `unet` that also takes `timestep_cond` (a guidance embedding), behaving as `unet` at first."""
    if unet.config.get("time_cond_proj_dim") is not None:
        return _copy(unet)
    student = diffusers.UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=dim)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise ConfigError(f"cannot add a guidance input to this U-Net (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return _like(student, unet)


def fold_guidance(student: diffusers.UNet2DConditionModel, guidance_scale: float) -> diffusers.UNet2DConditionModel:
    """A plain U-Net (no `time_cond_proj_dim`) computing `student` at a fixed guidance scale."""
    dim = student.config.get("time_cond_proj_dim")
    if dim is None:
        raise ConfigError("this U-Net has no guidance input to fold")
    emb = student.time_embedding
    with torch.no_grad():  # in fp32 whatever the stored dtype, then stored like the other weights
        w = torch.tensor([guidance_scale - 1.0], device=emb.cond_proj.weight.device)
        shift = guidance_embedding(w, dim)[0] @ emb.cond_proj.weight.float().T
        bias = emb.linear_1.weight.float() @ shift
        if emb.linear_1.bias is not None:
            bias = bias + emb.linear_1.bias.float()
    plain = diffusers.UNet2DConditionModel.from_config(student.config, time_cond_proj_dim=None)
    state = {k: v for k, v in student.state_dict().items() if k != "time_embedding.cond_proj.weight"}
    state["time_embedding.linear_1.bias"] = bias.to(emb.linear_1.weight.dtype)
    plain.load_state_dict(state)
    return _like(plain, student).eval()


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """`module` on `reference`'s device and dtype."""
    p = next(reference.parameters())
    module = module.to(p.device)
    return module if p.dtype == torch.float32 else module.to(dtype=p.dtype)


def _copy(unet: diffusers.UNet2DConditionModel) -> diffusers.UNet2DConditionModel:
    clone = diffusers.UNet2DConditionModel.from_config(unet.config)
    clone.load_state_dict(unet.state_dict())
    return _like(clone, unet)


def copy_unet(unet: diffusers.UNet2DConditionModel) -> diffusers.UNet2DConditionModel:
    """An independent copy of `unet` (weights and config)."""
    return _copy(unet)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float) -> None:
    """target ← decay·target + (1 − decay)·online, parameter by parameter (one fused kernel per list)."""
    t = [p for p in target.parameters()]
    o = [p.detach() for p in online.parameters()]
    torch._foreach_lerp_(t, o, 1.0 - decay)


def lcm_student(bundle: Bundle, unet: diffusers.UNet2DConditionModel, steps: int, guidance: float,
                original_steps: int | None = None) -> Bundle:
    """The Bundle with `unet`, an LCM scheduler (over `original_steps` of the teacher's timesteps when given)
    and its step count and guidance: how consistency (LCM) and one-step (DMD) students sample."""
    bundle.unet = unet.requires_grad_(False)
    config = dict(bundle.scheduler.config)
    if original_steps is not None:
        config["original_inference_steps"] = original_steps
    bundle.scheduler = make_scheduler("lcm", config)
    bundle.manifest.sampling = {"scheduler": "lcm", "steps": steps, "guidance_scale": guidance}
    return bundle

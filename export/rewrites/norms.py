"""GroupNorm / LayerNorm rewritten as reshape + mean + rsqrt, the form for backends with no norm op.

Recommended for ExecuTorch's XNNPACK delegate, which has no norm ops: a plain lowering cuts the U-Net into
dozens of delegate islands, while these ops it delegates. The ExecuTorch exporter applies them, and the Core ML
exporter traces through them as well. fp16 graphs compute the statistics in fp32 between two casts by default
(`NORM_STATISTICS`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...errors import ConfigError


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, with no cast op traced when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


class XnnpackGroupNorm(nn.Module):
    """GroupNorm as reshape + mean over the two innermost dims + rsqrt: ops XNNPACK delegates.

    With `upcast` an fp16 input is normalised in fp32 and the result cast back (see `NORM_STATISTICS`).
    """

    def __init__(self, norm: nn.GroupNorm, upcast: bool = False):
        super().__init__()
        self.groups, self.eps, self.weight, self.bias = norm.num_groups, norm.eps, norm.weight, norm.bias
        self.upcast = upcast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, c = x.shape, x.shape[1]
        work = torch.float32 if self.upcast else x.dtype
        y = _as(x, work).reshape(shape[0], self.groups, c // self.groups, -1)
        centred = y - y.mean(dim=(2, 3), keepdim=True)
        var = (centred * centred).mean(dim=(2, 3), keepdim=True)
        y = (centred * torch.rsqrt(var + self.eps)).reshape(shape)
        if self.weight is not None:
            affine = (1, c) + (1,) * (x.dim() - 2)
            y = y * _as(self.weight, work).reshape(affine) + _as(self.bias, work).reshape(affine)
        return _as(y, x.dtype)


class XnnpackLayerNorm(nn.Module):
    """LayerNorm over the last dim as a 4D mean over the two innermost dims: ops XNNPACK delegates.

    With `upcast` an fp16 input is normalised in fp32 and the result cast back (see `NORM_STATISTICS`).
    """

    def __init__(self, norm: nn.LayerNorm, upcast: bool = False):
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise ConfigError(f"LayerNorm over {tuple(norm.normalized_shape)} has no XNNPACK form here")
        self.eps, self.weight, self.bias, self.upcast = norm.eps, norm.weight, norm.bias, upcast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        work = torch.float32 if self.upcast else x.dtype
        y = _as(x, work).reshape(1, -1, 1, shape[-1])
        centred = y - y.mean(dim=(2, 3), keepdim=True)
        var = (centred * centred).mean(dim=(2, 3), keepdim=True)
        y = (centred * torch.rsqrt(var + self.eps)).reshape(shape)
        if self.weight is not None:
            y = y * _as(self.weight, work)
        if self.bias is not None:
            y = y + _as(self.bias, work)
        return _as(y, x.dtype)


# How fp16 graphs normalise: "fp32" (default) computes every GroupNorm / LayerNorm in fp32 between two casts,
# "fp16" in fp16. Measured on the built-in model (docs/BENCHMARKS.md): an fp16 U-Net with fp16 norms took the
# 8-step guided end-to-end PSNR to 36.59 dB (gate 35), with fp32 norms 57.46 dB; the casts run outside XNNPACK
# and split its graph (178 -> 350 delegate calls), so the batch-2 U-Net call is 1.24-1.35x slower (two runs).
NORM_STATISTICS = ("fp32", "fp16")


def rewrite_norms(module: nn.Module, statistics: str = "fp32") -> tuple[nn.Module, int]:
    """A copy of `module` with every GroupNorm / LayerNorm in its XNNPACK form, and how many were rewritten."""
    if statistics not in NORM_STATISTICS:
        raise ConfigError(f"unknown norm statistics {statistics!r}; choose from {', '.join(NORM_STATISTICS)}")
    upcast = statistics == "fp32"
    module = copy.deepcopy(module)
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, XnnpackGroupNorm(child, upcast))
                count += 1
            elif isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
                setattr(parent, name, XnnpackLayerNorm(child, upcast))
                count += 1
    return module, count

"""GEGLU feed-forward layers traced as two projections (value, gate) instead of one projection and a split.

diffusers' GEGLU computes `proj(x).chunk(2, -1)`: traced, that is one [B, S, 2F] MatMul and bias Add,
then two Slice copies of the halves plus the shape arithmetic that locates the split, in every
transformer block. Two linears over the same input write the halves directly, and put the gate's
bias Add right before its Gelu, which onnxruntime fuses into one BiasGelu kernel (the form recommended for
onnxruntime; the ONNX exporter applies it). The weights are the
two halves of `proj`, so the result is the same computation, in the same fp32 arithmetic per element.

Measured (one 2-core host, docs/BENCHMARKS.md): SD1.5's U-Net at 512² spends 60 instead of 118 ms per call in
Slice kernels, and the built-in U-Net runs 1,594 instead of 1,690 kernels; both whole-call changes are within
that host's run-to-run noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from torch import nn


class _SplitForward:
    """GEGLU.forward with the projection split in two; holds copies of the halves of `proj`."""

    def __init__(self, module: GEGLU):
        weight = module.proj.weight.detach()
        bias = module.proj.bias.detach() if module.proj.bias is not None else None
        half = weight.shape[0] // 2
        self.gelu = module.gelu
        self.value = (weight[:half].clone(), None if bias is None else bias[:half].clone())
        self.gate = (weight[half:].clone(), None if bias is None else bias[half:].clone())

    def __call__(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return F.linear(hidden_states, *self.value) * self.gelu(F.linear(hidden_states, *self.gate))


@contextmanager
def split_geglu(module: nn.Module) -> Iterator[int]:
    """Trace every diffusers GEGLU in `module` in split form; yields how many there are; restores on exit."""
    layers = [m for m in module.modules() if isinstance(m, GEGLU)]
    try:
        for m in layers:
            m.forward = _SplitForward(m)
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)

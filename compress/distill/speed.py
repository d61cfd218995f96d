"""How a distillation step's U-Net calls are made fast on a GPU: channels-last memory and, when
asked, `torch.compile` (the step is launch-bound at the built-in model's size). On a CPU the module
is returned as it is."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def prepare_for_speed(module: nn.Module, compile_mode: str, device: torch.device) -> Callable:
    """`module` (channels-last on CUDA), compiled with `compile_mode` unless it is "off"."""
    if device.type != "cuda":
        return module
    module.to(memory_format=torch.channels_last)
    if compile_mode == "off":
        return module
    return torch.compile(module, mode=None if compile_mode == "default" else compile_mode, dynamic=False)

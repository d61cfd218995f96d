"""The device a command runs on, checked before any work: `cpu`, `cuda` or `cuda:N`."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str | None) -> str:
    """`name` checked against this machine (None: cuda when present, else cpu); ConfigError otherwise."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use cpu or cuda (cuda:N for one of several GPUs)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but this machine has no usable CUDA GPU; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return str(device)

"""Resolve a MODEL argument to a Bundle: "fashion", "arch:NAME", a diffusers folder, or a .safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch

from .bundle import Bundle
from .errors import ConfigError, InputPathError
from .zoo import build_arch, load_fashion

DEFAULT_MODEL = "fashion"


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, shapes_only: bool = False) -> Bundle:
    """The Bundle named by `spec`; `shapes_only` builds arch:NAME models on the meta device."""
    if spec == "fashion":
        return load_fashion(dtype)
    if spec.startswith("arch:"):
        return build_arch(spec.removeprefix("arch:"), device="meta" if shapes_only else "cpu")
    path = Path(spec)
    if path.suffix == ".safetensors":
        raise ConfigError(f"{spec}: single-file checkpoints are not supported yet; convert it to a diffusers "
                          "folder (diffusers' StableDiffusionPipeline.from_single_file) and give the folder")
    if not path.exists():
        raise InputPathError(f"{spec}: no such model; give 'fashion', arch:NAME (sd15, sd21, sdxl, tiny) "
                             "or a diffusers pipeline folder")
    return Bundle.load(path, dtype=dtype)

"""Resolve a MODEL argument to a Bundle: "fashion", "arch:NAME", a diffusers folder, or a .safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch

from .bundle import Bundle
from .errors import InputPathError
from .zoo import BUILTIN_MODELS, build_arch, load_builtin

DEFAULT_MODEL = "fashion"


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, shapes_only: bool = False,
               config: Path | None = None) -> Bundle:
    """The Bundle named by `spec`; `shapes_only` builds arch:NAME models on the meta device;
    `config` is the diffusers config folder for a single-file checkpoint (default: the zoo's)."""
    if spec in BUILTIN_MODELS:
        return load_builtin(spec, dtype)
    if spec.startswith("arch:"):
        return build_arch(spec.removeprefix("arch:"), device="meta" if shapes_only else "cpu")
    path = Path(spec)
    if path.suffix == ".safetensors":
        from .single_file import load_single_file

        return load_single_file(path, config, dtype)
    if not path.exists():
        raise InputPathError(f"{spec}: no such model; give a built-in model ({', '.join(BUILTIN_MODELS)}), arch:NAME (sd15, sd21, sdxl, tiny), "
                             "a diffusers pipeline folder or an SD1.x/SD2.x .safetensors checkpoint")
    return Bundle.load(path, dtype=dtype)

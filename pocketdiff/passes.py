"""Passes that reconfigure a Bundle without training: its default scheduler and its storage precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .bundle import Bundle
from .errors import RecipeError
from .recipe import register_pass
from .schedulers import make_scheduler, scheduler_names

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _weight_bytes(bundle: Bundle) -> int:
    return sum(p.numel() * p.element_size() for m in bundle.modules().values() for p in m.parameters())


@register_pass
class SchedulerPass:
    """Set the pipeline's default sampling scheduler (same noise schedule, another solver)."""

    name = "scheduler"

    @dataclass
    class Settings:
        kind: str = "dpmsolver++"

        def __post_init__(self) -> None:
            if self.kind not in scheduler_names():
                raise RecipeError(f"scheduler kind {self.kind!r} unknown; choose one of {', '.join(scheduler_names())}")

    def apply(self, bundle: Bundle, settings: Settings) -> tuple[Bundle, dict[str, Any]]:
        before = type(bundle.scheduler).__name__
        bundle.scheduler = make_scheduler(settings.kind, bundle.scheduler.config)
        return bundle, {"scheduler_before": before, "scheduler_after": type(bundle.scheduler).__name__}


@register_pass
class CastPass:
    """Store the weights of the chosen components at another floating-point precision."""

    name = "cast"

    @dataclass
    class Settings:
        dtype: str = "float16"
        components: str = "unet,vae"

        def __post_init__(self) -> None:
            if self.dtype not in _DTYPES:
                raise RecipeError(f"cast dtype {self.dtype!r} unknown; choose one of {', '.join(_DTYPES)}")

    def apply(self, bundle: Bundle, settings: Settings) -> tuple[Bundle, dict[str, Any]]:
        names = [c.strip() for c in settings.components.split(",") if c.strip()]
        modules = bundle.modules()
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise RecipeError(f"cast: component {unknown[0]!r} not in this model ({', '.join(modules)})")
        before = _weight_bytes(bundle)
        for n in names:
            modules[n].to(_DTYPES[settings.dtype])
        return bundle, {"weight_bytes_before": before, "weight_bytes_after": _weight_bytes(bundle)}

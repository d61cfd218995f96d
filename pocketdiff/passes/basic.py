"""Passes that reconfigure a Bundle without training: its default scheduler and its storage precision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..bundle import Bundle
from ..errors import RecipeError
from ..schedulers import make_scheduler, scheduler_names
from . import PassContext, PassResult, register_pass

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
                raise ValueError(f"scheduler kind {self.kind!r} unknown; choose one of {', '.join(scheduler_names())}")

    def check(self, bundle: Bundle, settings: Settings, ctx: PassContext) -> None:
        pass

    def apply(self, bundle: Bundle, settings: Settings, ctx: PassContext) -> PassResult:
        before = type(bundle.scheduler).__name__
        bundle.scheduler = make_scheduler(settings.kind, bundle.scheduler.config)
        return PassResult(bundle, {"scheduler_before": before, "scheduler_after": type(bundle.scheduler).__name__})


@register_pass
class CastPass:
    """Store the weights of the chosen components at another floating-point precision."""

    name = "cast"

    @dataclass
    class Settings:
        dtype: Literal["float32", "float16", "bfloat16"] = "float16"
        components: list[str] = field(default_factory=lambda: ["unet", "vae"])

    def check(self, bundle: Bundle, settings: Settings, ctx: PassContext) -> None:
        modules = bundle.modules()
        unknown = [n for n in settings.components if n not in modules]
        if unknown:
            raise RecipeError(f"cast: component {unknown[0]!r} not in this model ({', '.join(modules)})")

    def apply(self, bundle: Bundle, settings: Settings, ctx: PassContext) -> PassResult:
        modules = bundle.modules()
        before = _weight_bytes(bundle)
        for n in settings.components:
            modules[n].to(_DTYPES[settings.dtype])
        return PassResult(bundle, {"weight_bytes_before": before, "weight_bytes_after": _weight_bytes(bundle)})

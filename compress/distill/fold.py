"""Bake a guidance-conditioned student's guidance into a plain U-Net of the teacher's config."""

from __future__ import annotations

from dataclasses import dataclass

from ...bundle import Bundle
from ...errors import ConfigError
from ...passes import PassContext, PassResult, register_pass
from ...settings import setting
from .student import fold_guidance


@register_pass
class FoldGuidancePass:
    """A fixed guidance folded into the time embedding: one U-Net call per step, no guidance input."""

    name = "fold-guidance"

    @dataclass
    class Settings:
        guidance: float | None = setting(None, min=1.0, help="guidance to bake in (default: the one the "
                                                            "student is sampled with)")

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        if bundle.unet.config.get("time_cond_proj_dim") is None:
            raise ConfigError("fold-guidance needs a student with a guidance input (run after lcm or "
                              "progressive's guided stage)")

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        w = s.guidance if s.guidance is not None else float(bundle.manifest.sampling.get("guidance_scale", 1.0))
        bundle.unet = fold_guidance(bundle.unet, w)
        bundle.manifest.sampling = {**bundle.manifest.sampling, "guidance_scale": 1.0}
        return PassResult(bundle, {"guidance": w})

"""Recipe stages on an earlier `export` stage's artifacts, in the real runtimes; the Bundle passes through.

`validate`: the same harness as `pocketdiff validate` (same prompts, seed and gates). A target that misses
its gate fails the stage, so a run never records artifacts that do not match their model; the report is
kept as the stage's `artifacts/validation.json`.
`profile`: the same measurement as `pocketdiff profile` (latency per component and per image, memory,
MACs, device estimates; `against` another export folder, side by side), kept as `artifacts/profile.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..bundle import Bundle
from ..errors import RecipeError
from ..fileio import atomic_write_json
from ..passes import ARTIFACTS, PassContext, PassResult, register_pass
from ..settings import setting
from ..export.base import MANIFEST
from .harness import ValidateConfig, raise_on_failure, validate
from .profiler import ProfileConfig, profile_folder

EXPORT_STAGE = "export"


def exported_folder(ctx: PassContext, stage: str) -> Path:
    """The artifacts folder of the latest export stage before this one; RecipeError when there is none."""
    exports = [f for f in ctx.earlier if f.name.split("-", 1)[-1] == EXPORT_STAGE]
    if not exports:
        raise RecipeError(f"a '{stage}' stage needs an '{EXPORT_STAGE}' stage before it in the recipe")
    return exports[-1] / ARTIFACTS


def _kept(ctx: PassContext, name: str, report: dict) -> Path:
    """`report` written as `name` in a fresh artifacts folder of the work folder."""
    out = ctx.work_dir / ARTIFACTS
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / name, report)
    return out


@register_pass
class ValidatePass:
    """Validate the latest exported artifacts against the Bundle they were exported from."""

    name = "validate"

    @dataclass
    class Settings:
        steps: int | None = setting(None, min=1, help="sampling steps (default: the model's own, else 8)")
        seed: int = setting(0, min=0)

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        exported_folder(ctx, self.name)

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        report = validate(exported_folder(ctx, self.name), bundle=bundle,
                          config=ValidateConfig(steps=s.steps, seed=s.seed), progress=ctx.progress)
        raise_on_failure(report)
        out = _kept(ctx, "validation.json", report)
        summary = {t["target"]: {"status": t["status"], "psnr_db": t["psnr_db"], "gate_db": t["gate_db"]}
                   for t in report["targets"]}
        return PassResult(bundle, {"targets": summary, "steps": report["steps"]}, artifacts=out, unchanged=True)


@register_pass
class ProfilePass:
    """Profile the latest exported artifacts (and `against` another export, side by side)."""

    name = "profile"

    @dataclass
    class Settings:
        blocks: int = setting(4, min=1, help="rotating timing blocks")
        per_block: int = setting(2, min=1, help="timed calls per runner per block")
        devices: list[str] | None = setting(None, help="phone profiles to estimate for (default: all)")
        against: str | None = setting(None, help="another export folder with the same targets and components")

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        from .estimates import get_devices

        exported_folder(ctx, self.name)
        get_devices(s.devices)
        if s.against is not None and not (Path(s.against) / MANIFEST).is_file():
            raise RecipeError(f"profile against {s.against!r}: not a folder written by `pocketdiff export` "
                              f"(no {MANIFEST})")

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        config = ProfileConfig(blocks=s.blocks, per_block=s.per_block, devices=s.devices)
        report = profile_folder(exported_folder(ctx, self.name), Path(s.against) if s.against else None, config)
        return PassResult(bundle, _profile_summary(report), artifacts=_kept(ctx, "profile.json", report),
                          unchanged=True)


def _profile_summary(report: dict) -> dict:
    """The stage report's figures: per target, median ms per component call and per image (and the ratios
    against the other folder)."""
    out: dict = {}
    for target, t in report["profiles"]["A"]["targets"].items():
        if t.get("status") == "measured":
            out[target] = {c: row["median_ms"] for c, row in t["components"].items()}
            if t["image"]:
                out[target]["image"] = t["image"]["median_ms"]
    return {"median_ms": out} | ({"against": report["against"]["targets"]} if "against" in report else {})

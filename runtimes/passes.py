"""The `validate` recipe stage: an earlier `export` stage's artifacts against the Bundle, in the real runtimes.

The same harness as `pocketdiff validate` (same prompts, seed and gates). A target that misses its gate
fails the stage, so a run never records artifacts that do not match their model; the report is kept as
the stage's `artifacts/validation.json`. The Bundle passes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..bundle import Bundle
from ..errors import RecipeError
from ..fileio import atomic_write_json
from ..passes import PassContext, PassResult, register_pass
from ..settings import setting
from .harness import ValidateConfig, raise_on_failure, validate

EXPORT_STAGE = "export"


def exported_folder(ctx: PassContext) -> Path:
    """The artifacts folder of the latest export stage before this one; RecipeError when there is none."""
    exports = [f for f in ctx.earlier if f.name.split("-", 1)[-1] == EXPORT_STAGE]
    if not exports:
        raise RecipeError(f"a 'validate' stage needs an '{EXPORT_STAGE}' stage before it in the recipe")
    return exports[-1] / "artifacts"


@register_pass
class ValidatePass:
    """Validate the latest exported artifacts against the Bundle they were exported from."""

    name = "validate"

    @dataclass
    class Settings:
        steps: int | None = setting(None, min=1, help="sampling steps (default: the model's own, else 8)")
        seed: int = setting(0, min=0)

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        exported_folder(ctx)

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        report = validate(exported_folder(ctx), bundle=bundle, config=ValidateConfig(steps=s.steps, seed=s.seed),
                          progress=ctx.progress)
        raise_on_failure(report)
        out = ctx.work_dir / "artifacts"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "validation.json", report)
        summary = {t["target"]: {"status": t["status"], "psnr_db": t["psnr_db"], "gate_db": t["gate_db"]}
                   for t in report["targets"]}
        return PassResult(bundle, {"targets": summary, "steps": report["steps"]}, artifacts=out, unchanged=True)

"""The `export` recipe stage: the Bundle's components as runtime artifacts, kept in the stage folder.

The stage passes its Bundle through unchanged (no second copy of the weights in the run folder); its
`artifacts/` folder is what `pocketdiff export` writes, so `pocketdiff validate RUN/NN-export/artifacts`
and an app take it as they take any export. Later stages (`validate`) find it through the context.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..bundle import Bundle
from ..passes import ARTIFACTS, PassContext, PassResult, register_pass
from ..settings import setting
from .base import ExportOptions, export_bundle, get_exporter, load_builtins
from .components import wrap

Target = Literal["onnx", "executorch", "coreml"]
Component = Literal["text_encoder", "unet", "vae_decoder", "vae_encoder"]


@register_pass
class ExportPass:
    """Export the Bundle to ONNX / ExecuTorch / Core ML artifacts; the Bundle itself passes through."""

    name = "export"

    @dataclass
    class Settings:
        targets: list[Target] = setting(default_factory=lambda: ["onnx"], help="runtimes to export for")
        components: list[Component] = setting(default_factory=lambda: ["text_encoder", "unet", "vae_decoder"])
        precision: Literal["fp32", "fp16"] = "fp32"
        batch_sizes: list[int] = setting(default_factory=lambda: [1, 2], help="batch sizes each artifact takes")

        def __post_init__(self) -> None:
            for name in ("targets", "components", "batch_sizes"):
                if not getattr(self, name):
                    raise ValueError(f"{name} must list at least one value")
            if min(self.batch_sizes) < 1:
                raise ValueError(f"batch sizes must be at least 1, got {self.batch_sizes}")

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        load_builtins()
        for target in s.targets:
            get_exporter(target)
        for component in s.components:  # a component the Bundle lacks fails here, before any export
            wrap(bundle, component)

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        out = ctx.work_dir / ARTIFACTS
        shutil.rmtree(out, ignore_errors=True)  # an interrupted attempt's leftovers
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        options = ExportOptions(components=tuple(s.components), precision=s.precision,
                                batch_sizes=tuple(s.batch_sizes))
        # artifacts.json names where the weights are, as `pocketdiff export` does: validate and profile load it
        where = Path(ctx.model) if ctx.input_folder is None else ctx.input_folder
        model = str(where.resolve()) if where.exists() else ctx.model
        aset = export_bundle(bundle, model, list(s.targets), options, out, log=ctx.log)
        report = {"artifacts": [{"target": a.target, "component": a.component, "precision": a.precision,
                                 "path": a.path, "bytes": a.details.get("bytes"),
                                 "export_seconds": a.details.get("export_seconds")} for a in aset.artifacts]}
        return PassResult(bundle, report, artifacts=out, unchanged=True)

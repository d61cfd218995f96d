"""Passes: one job each, `Bundle -> Bundle` plus a report, registered by name for recipes.

A pass gets a `PassContext`: where it runs (device, dtype), a work folder inside the run folder
for its checkpoints, a deadline, the teacher Bundle where it needs one, and whether to show
progress. A training pass may return `PassResult(finished=False)` when its deadline comes: the
runner records the stage as unfinished and the next `pocketdiff run` calls the pass again with
the same work folder, so it resumes from its checkpoint. Built-in passes are found by importing
the modules named in `BUILTIN_MODULES` the first time a pass is looked up.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from ..bundle import Bundle
from ..errors import ConfigError, RecipeError
from ..registry import Registry
from ..settings import parse

ARTIFACTS = "artifacts"  # a stage folder's own files besides its Bundle (exported graphs, reports)
BUILTIN_MODULES = ("pocketdiff.passes.basic", "pocketdiff.compress.distill.lcm", "pocketdiff.compress.distill.fold",
                   "pocketdiff.compress.distill.progressive", "pocketdiff.compress.distill.cfg_aware",
                   "pocketdiff.compress.distill.dmd",
                   "pocketdiff.compress.slim.blocks", "pocketdiff.compress.slim.decoder",
                   "pocketdiff.compress.slim.recovery", "pocketdiff.compress.slim.prune",
                   "pocketdiff.export.passes", "pocketdiff.runtimes.passes")


@dataclass
class PassContext:
    """What a pass may use besides its input Bundle and settings."""

    work_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    deadline: float | None = None  # time.monotonic() value after which a training pass stops resumably
    teacher_loader: Callable[[], Bundle] | None = None
    progress: bool = True
    log: Callable[[str], None] = lambda _: None
    earlier: tuple[Path, ...] = ()  # the stage folders before this one (their `artifacts/` folders)
    model: str = ""  # the run's source model, as the recipe or --model named it
    input_folder: Path | None = None  # the folder holding the input Bundle's weights (None: the source model)
    _teacher: Bundle | None = None

    @property
    def teacher(self) -> Bundle:
        """The teacher Bundle (the recipe's model unless the recipe names another), loaded once."""
        if self._teacher is None:
            if self.teacher_loader is None:
                raise ConfigError("this pass needs a teacher, and the run has none")
            self._teacher = self.teacher_loader()
        return self._teacher

    def seconds_left(self) -> float | None:
        """Seconds until the deadline (None: no limit)."""
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass
class PassResult:
    """A pass's output: the new Bundle (None while unfinished), its measured report, and whether it finished.
    `unchanged`: the pass returns its input Bundle as it got it (export, validation), so the runner stores no
    second copy of the weights. `artifacts`, a folder the pass wrote in its work folder, is kept as the stage
    folder's `artifacts/`."""

    bundle: Bundle | None
    report: dict[str, Any] = field(default_factory=dict)
    finished: bool = True
    artifacts: Path | None = None
    unchanged: bool = False


class Pass(Protocol):
    """One transformation of a Bundle."""

    name: ClassVar[str]
    Settings: ClassVar[type]

    def check(self, bundle: Bundle, settings: Any, ctx: PassContext) -> None:
        """Raise a UserError for input this pass cannot use, before any expensive work."""
        ...

    def apply(self, bundle: Bundle, settings: Any, ctx: PassContext) -> PassResult:
        """Return the new Bundle and a report of what changed (measured figures only)."""
        ...


def _load_builtin_passes() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


PASSES: Registry[Pass] = Registry("name", RecipeError, lambda name: f"unknown pass {name!r}", load=_load_builtin_passes)
register_pass = PASSES.register
get_pass = PASSES.create


def parse_settings(pass_name: str, raw: dict[str, Any]) -> Any:
    """The pass's Settings dataclass from a TOML table; RecipeError on unknown keys, bad types or ranges."""
    return parse(type(get_pass(pass_name)).Settings, raw, where=f"pass {pass_name!r}")

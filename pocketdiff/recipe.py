"""Passes, their registry, and TOML recipes (ordered lists of passes with settings).

A Pass has one job: `Bundle -> Bundle` plus a report of what it changed. Passes register under a
name; a recipe names them in order. Settings are dataclasses, so an unknown or mistyped setting is
caught when the recipe is read, before any work starts.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from .bundle import Bundle
from .errors import RecipeError
from .registry import Registry


class Pass(Protocol):
    """One transformation of a Bundle."""

    name: ClassVar[str]
    Settings: ClassVar[type]

    def apply(self, bundle: Bundle, settings: Any) -> tuple[Bundle, dict[str, Any]]:
        """Return the new Bundle and a report of what changed (measured figures only)."""
        ...


def _load_builtin_passes() -> None:
    from . import passes  # noqa: F401  (registers on import)


PASSES: Registry[Pass] = Registry("name", RecipeError, lambda name: f"unknown pass {name!r}", load=_load_builtin_passes)
register_pass = PASSES.register
get_pass = PASSES.create


def parse_settings(pass_name: str, raw: dict[str, Any]) -> Any:
    """Build the pass's Settings dataclass from a TOML table; RecipeError on unknown keys or bad types."""
    cls = type(get_pass(pass_name)).Settings
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise RecipeError(f"pass {pass_name!r} has no setting {unknown[0]!r}; settings: {', '.join(fields) or 'none'}")
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        expected = hints[key]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise RecipeError(f"pass {pass_name!r}: setting {key!r} must be {expected.__name__}, got {value!r}")
    try:
        return cls(**raw)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"pass {pass_name!r}: {e}") from e


@dataclass
class Stage:
    """One step of a recipe: a pass and its validated settings."""

    name: str
    settings: Any

    def settings_dict(self) -> dict[str, Any]:
        """The settings as plain data (for manifests and cache keys)."""
        return dataclasses.asdict(self.settings)


@dataclass
class Recipe:
    """A model and the passes to apply to it, in order, plus how to sample the result."""

    model: str
    stages: list[Stage]
    sample: dict[str, Any] = field(default_factory=dict)
    source: str = ""


SAMPLE_KEYS = {"prompts", "steps", "scheduler", "guidance_scale", "seed", "negative_prompt"}


def builtin_recipes() -> dict[str, Path]:
    """Recipes shipped with the package, by name."""
    return {p.stem: p for p in sorted((Path(__file__).parent / "recipes").glob("*.toml"))}


def load_recipe(spec: str | Path) -> Recipe:
    """Read a recipe from a TOML file or a built-in recipe name."""
    path = builtin_recipes().get(str(spec), Path(spec))
    if not path.is_file():
        raise RecipeError(f"{spec}: no such recipe file; built-in recipes: {', '.join(builtin_recipes())}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from e
    unknown = sorted(set(data) - {"model", "pass", "sample"})
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key {unknown[0]!r} (use model, [[pass]], [sample])")
    stages = []
    for i, table in enumerate(data.get("pass", [])):
        table = dict(table)
        if "name" not in table:
            raise RecipeError(f"{path}: [[pass]] number {i + 1} has no name")
        name = table.pop("name")
        stages.append(Stage(name, parse_settings(name, table)))
    sample = dict(data.get("sample", {}))
    bad = sorted(set(sample) - SAMPLE_KEYS)
    if bad:
        raise RecipeError(f"{path}: [sample] has no setting {bad[0]!r}; settings: {', '.join(sorted(SAMPLE_KEYS))}")
    return Recipe(model=str(data.get("model", "fashion")), stages=stages, sample=sample, source=str(path))

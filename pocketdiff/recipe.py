"""TOML recipes: ordered lists of registered passes with typed settings.

A recipe names a model (and optionally the teacher that training passes distil from), passes in
order with their settings, and how to sample the result. Settings are dataclasses read by
`pocketdiff.settings`, so an unknown, mistyped or out-of-range setting fails when the recipe is
read, before any work starts.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .passes import get_pass, parse_settings
from .settings import as_plain, parse, setting


@dataclass
class Stage:
    """One step of a recipe: a pass and its validated settings."""

    name: str
    settings: Any

    def settings_dict(self) -> dict[str, Any]:
        """The settings as plain data (for manifests and cache keys)."""
        return as_plain(self.settings)


@dataclass
class SampleSettings:
    """The recipe's `[sample]` table: what to draw from the final Bundle (unset: the Bundle's own defaults)."""

    prompts: list[str] = setting(default_factory=lambda: ["a photo of a sneaker"], help="prompts to draw")
    steps: int | None = setting(None, min=1, max=1000, help="sampling steps")
    scheduler: str | None = setting(None, help="sampling scheduler")
    guidance_scale: float | None = setting(None, min=0.0, max=100.0, help="classifier-free guidance scale")
    negative_prompt: str = ""
    seed: int = setting(0, min=0, max=2**63 - 1, help="seed of the first image")

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("prompts must list at least one prompt")


@dataclass
class Recipe:
    """A model and the passes to apply to it, in order, plus how to sample the result."""

    model: str
    stages: list[Stage]
    sample: SampleSettings | None = None
    source: str = ""
    teacher: str | None = None  # the model training passes distil from (default: `model`)


def builtin_recipes() -> dict[str, Path]:
    """Recipes shipped with the package, by name."""
    return {p.stem: p for p in sorted((Path(__file__).parent / "recipes").glob("*.toml"))}


def load_recipe(spec: str | Path) -> Recipe:
    """Read a recipe from a TOML file or a built-in recipe name; every setting is checked here."""
    path = builtin_recipes().get(str(spec), Path(spec))
    if not path.is_file():
        raise RecipeError(f"{spec}: no such recipe file; built-in recipes: {', '.join(builtin_recipes())}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from e
    unknown = sorted(set(data) - {"model", "teacher", "pass", "sample"})
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key {unknown[0]!r} (use model, teacher, [[pass]], [sample])")
    for key in ("model", "teacher"):
        if key in data and not isinstance(data[key], str):
            raise RecipeError(f"{path}: {key} must be a string naming a model, got {data[key]!r}")
    tables = data.get("pass", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RecipeError(f"{path}: pass must be an array of tables ([[pass]] with a name each)")
    stages = []
    for i, table in enumerate(tables):
        table = dict(table)
        name = table.pop("name", None)
        if not isinstance(name, str):
            raise RecipeError(f"{path}: [[pass]] number {i + 1} has no name (a string)")
        get_pass(name)
        stages.append(Stage(name, parse_settings(name, table)))
    sample = parse(SampleSettings, data["sample"], where=f"{path}: [sample]") if "sample" in data else None
    return Recipe(model=data.get("model", "fashion"), stages=stages, sample=sample, source=str(path),
                  teacher=data.get("teacher"))

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


def parse_override(text: str) -> tuple[str, str, Any]:
    """`PASS.KEY=VALUE` (PASS: a pass name or its 1-based number; VALUE: TOML, or else a bare string)."""
    target, eq, value = text.partition("=")
    where, dot, key = target.strip().rpartition(".")
    if not eq or not dot or not where or not key:
        raise RecipeError(f"--set {text!r}: write PASS.KEY=VALUE, e.g. dmd.gan_weight=0 or 2.dtype=float16")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return where, key.strip(), parsed


def _apply_overrides(path: Path, tables: list[dict], overrides: list[str]) -> None:
    for text in overrides:
        where, key, value = parse_override(text)
        if where.isdigit():
            hits = [int(where) - 1] if 0 < int(where) <= len(tables) else []
        else:
            hits = [i for i, t in enumerate(tables) if t.get("name") == where]
        if len(hits) != 1:
            raise RecipeError(f"--set {text!r}: {path.name} has {'no' if not hits else len(hits)} pass {where!r} "
                              f"(its passes: {', '.join(str(t.get('name')) for t in tables)}; number them to pick one)")
        if key == "name":
            raise RecipeError(f"--set {text!r}: a pass's name cannot be overridden")
        tables[hits[0]][key] = value


def load_recipe(spec: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe from a TOML file or a built-in recipe name, with `--set PASS.KEY=VALUE` overrides
    (ablations and resized runs without a copied recipe file); every setting is checked here."""
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
    tables = [dict(t) for t in tables]
    _apply_overrides(path, tables, overrides or [])
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

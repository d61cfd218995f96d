"""Run a recipe stage by stage into a run folder, skipping stages that are already done.

Layout of a run folder:
    01-<pass>/ ... NN-<pass>/   one Bundle per finished stage (diffusers folder + pocketdiff.json)
                                plus stage.json, written last: the stage's commit marker
    samples/                    images sampled from the final Bundle, when the recipe has [sample]
    run.json                    what happened this time (stages run or skipped, reports, seconds)

Each stage's key hashes the previous stage's key, the pass name and its settings (the first key
hashes the source model's content hash). A stage folder whose stage.json holds the same key is
reused; everything after the first changed stage is recomputed. Every write is atomic, so Ctrl-C
or a failure leaves the finished stages intact and a rerun resumes from them.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .bundle import Bundle
from .fileio import atomic_dir, atomic_write_json, hash_json
from .recipe import Recipe, Stage, get_pass
from .sources import load_model

STAGE_FILE = "stage.json"


@dataclass
class StageResult:
    """What one stage did in this run."""

    index: int
    name: str
    folder: str
    key: str
    status: str  # "ran" or "reused"
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)


def stage_key(previous: str, stage: Stage) -> str:
    """The cache key of a stage: its input's key, its pass and its settings."""
    return hash_json({"input": previous, "pass": stage.name, "settings": stage.settings_dict(),
                      "pocketdiff": __version__})


def stage_folder(run_dir: Path, index: int, stage: Stage) -> Path:
    """Where stage `index` (1-based) of a run keeps its Bundle."""
    return run_dir / f"{index:02d}-{stage.name}"


def _finished_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / STAGE_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def run_recipe(recipe: Recipe, run_dir: Path, model: str | None = None, config: Path | None = None,
               log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Execute `recipe` into `run_dir` (`model` overrides the recipe's; `config` is a single-file
    checkpoint's config folder); returns a summary, also written to run.json."""
    run_dir = Path(run_dir)
    spec = model or recipe.model
    bundle: Bundle | None = load_model(spec, config=config)
    key = hash_json({"model": spec, "content": bundle.manifest.content_hash or bundle.manifest.source})
    results: list[StageResult] = []
    for i, stage in enumerate(recipe.stages, start=1):
        key = stage_key(key, stage)
        folder = stage_folder(run_dir, i, stage)
        if _finished_key(folder) == key:
            results.append(StageResult(i, stage.name, folder.name, key, "reused", 0.0,
                                       json.loads((folder / STAGE_FILE).read_text()).get("report", {})))
            log(f"[{i}/{len(recipe.stages)}] {stage.name}: unchanged, reusing {folder}")
            bundle = None
            continue
        if bundle is None:
            bundle = Bundle.load(stage_folder(run_dir, i - 1, recipe.stages[i - 2]))
        log(f"[{i}/{len(recipe.stages)}] {stage.name} ...")
        t0 = time.monotonic()
        bundle, report = get_pass(stage.name).apply(bundle, stage.settings)
        bundle.manifest.passes.append({"pass": stage.name, "settings": stage.settings_dict(), "report": report})
        with atomic_dir(folder) as tmp:
            bundle.write_into(tmp)
            seconds = round(time.monotonic() - t0, 2)
            atomic_write_json(tmp / STAGE_FILE, {"key": key, "pass": stage.name, "settings": stage.settings_dict(),
                                                 "report": report, "seconds": seconds})
        results.append(StageResult(i, stage.name, folder.name, key, "ran", seconds, report))
        log(f"[{i}/{len(recipe.stages)}] {stage.name}: done in {seconds:.1f} s")
    final = bundle
    if recipe.sample:
        if final is None:
            final = Bundle.load(stage_folder(run_dir, len(recipe.stages), recipe.stages[-1]))
        samples = _sample(final, recipe.sample, run_dir / "samples")
    else:
        samples = []
    summary = {"recipe": recipe.source, "model": spec, "run_dir": str(run_dir),
               "stages": [r.__dict__ for r in results], "samples": samples}
    atomic_write_json(run_dir / "run.json", summary)
    return summary


def _sample(bundle: Bundle, settings: dict[str, Any], out: Path) -> list[str]:
    """Sample the final Bundle with the recipe's [sample] settings into `out`, atomically."""
    from .sampler import SampleConfig, generate, to_pil

    bundle.to("cpu", torch.float32)  # the reference sampler runs in fp32 on the host
    prompts = list(settings.get("prompts", ["a photo of a sneaker"]))
    cfg = SampleConfig(**{k: v for k, v in settings.items() if k != "prompts"})
    images = generate(bundle, prompts, cfg, progress=True)
    names = []
    with atomic_dir(out) as tmp:
        for i, img in enumerate(to_pil(images)):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            name = f"{i:04d}_seed{cfg.seed + i}.png"
            (tmp / name).write_bytes(buf.getvalue())
            names.append(str(out / name))
    return names

"""Run a recipe stage by stage into a run folder, skipping stages that are already done.

Layout of a run folder:
    01-<pass>/ ... NN-<pass>/   one Bundle per finished stage (diffusers folder + pocketdiff.json)
                                plus stage.json, written last: the stage's commit marker; a stage
                                whose pass keeps its input Bundle (export, validate) holds no weights
                                (stage.json's `weights` names the stage folder that does, null for
                                the source model) and its pass's files in artifacts/
    .work/NN-<pass>-<key>/      a training pass's checkpoints and logs while its stage is unfinished
    samples/                    images sampled from the final Bundle, when the recipe has [sample]
    run.json                    what happened this time (stages run, reused or unfinished, reports)

Each stage's key hashes the previous stage's key, the pass name and its settings (the first key
hashes the source model's content hash). A stage folder whose stage.json holds the same key is
reused; everything after the first changed stage is recomputed. Every write is atomic, so Ctrl-C
or a failure leaves the finished stages intact and a rerun resumes from them. A training pass that
reaches the run's deadline ends its stage *unfinished*: nothing is written in the stage folder, the
run stops there, and the next run hands the pass the same work folder (keyed by the stage key, so
changed settings never resume a foreign checkpoint) to continue from its checkpoint. Every pass's
`check` runs before its stage does any work (the first stage to run is checked before anything
runs), so bad input fails in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__, distributed
from .bundle import Bundle
from .fileio import atomic_dir, atomic_write_json, hash_json
from .passes import ARTIFACTS, PassContext, get_pass
from .recipe import Recipe, SampleSettings, Stage
from .sources import load_model

WORK = ".work"

STAGE_FILE = "stage.json"
RUN_FILE = "run.json"  # written when work starts (marks the folder as a run) and again at the end


@dataclass
class StageResult:
    """What one stage did in this run."""

    index: int
    name: str
    folder: str
    key: str
    status: str  # "ran", "reused" or "unfinished"
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)


def stage_key(previous: str, stage: Stage, teacher: str = "") -> str:
    """The cache key of a stage: its input's key, its pass, its settings and the teacher's key."""
    return hash_json({"input": previous, "pass": stage.name, "settings": stage.settings_dict(),
                      "teacher": teacher, "pocketdiff": __version__})


def stage_folder(run_dir: Path, index: int, stage: Stage) -> Path:
    """Where stage `index` (1-based) of a run keeps its Bundle."""
    return run_dir / f"{index:02d}-{stage.name}"


def _finished_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / STAGE_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def weights_folder(folder: Path) -> str | None:
    """The name of the stage folder holding a finished stage's Bundle (None: the run's source model)."""
    data = json.loads((folder / STAGE_FILE).read_text())
    return data.get("weights", folder.name)


def work_folder(run_dir: Path, index: int, stage: Stage, key: str) -> Path:
    """Where stage `index`'s pass keeps checkpoints while unfinished (removed once the stage is written)."""
    return run_dir / WORK / f"{index:02d}-{stage.name}-{key[:16]}"


@dataclass
class RunOptions:
    """How a run executes: where, how long, and how it reports."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    time_limit_s: float | None = None
    progress: bool = True
    log: Callable[[str], None] = lambda _: None


def run_recipe(recipe: Recipe, run_dir: Path, model: str | None = None, config: Path | None = None,
               options: RunOptions | None = None) -> dict[str, Any]:
    """Execute `recipe` into `run_dir` (`model` overrides the recipe's; `config` is a single-file
    checkpoint's config folder); returns a summary, also written to run.json. The summary's
    `finished` is False when a stage stopped at the time limit: run again to resume it."""
    opts = options or RunOptions()
    log = opts.log
    run_dir = Path(run_dir)
    deadline = None if opts.time_limit_s is None else time.monotonic() + opts.time_limit_s
    spec = model or recipe.model
    source: Bundle | None = load_model(spec, config=config)
    key = hash_json({"model": spec, "content": source.manifest.content_hash or source.manifest.source})
    teacher_spec = recipe.teacher or spec
    teacher_key = key if teacher_spec == spec else hash_json({"teacher": teacher_spec})

    def teacher() -> Bundle:
        return load_model(teacher_spec, config=config if teacher_spec == spec else None)

    keys, contexts = [], []
    for i, stage in enumerate(recipe.stages, start=1):
        key = stage_key(key, stage, teacher_key)
        keys.append(key)
        contexts.append(PassContext(work_dir=work_folder(run_dir, i, stage, key), device=torch.device(opts.device),
                                    dtype=opts.dtype, deadline=deadline, teacher_loader=teacher,
                                    progress=opts.progress, log=log, model=spec,
                                    earlier=tuple(stage_folder(run_dir, j, s) for j, s in
                                                  enumerate(recipe.stages[:i - 1], start=1))))
    todo = [i for i, (stage, key) in enumerate(zip(recipe.stages, keys)) if _finished_key(
        stage_folder(run_dir, i + 1, stage)) != key]

    def stage_bundle(index: int) -> tuple[Bundle, str | None]:
        """Stage `index`'s Bundle (0: the source) and the stage folder holding its weights (None: the source)."""
        home = None if index == 0 else weights_folder(stage_folder(run_dir, index, recipe.stages[index - 1]))
        return (source if home is None else Bundle.load(run_dir / home)), home

    if todo:  # the first stage to run is checked before anything runs; later ones before their own work
        first = todo[0]
        first_input = stage_bundle(first)[0]
        get_pass(recipe.stages[first].name).check(first_input, recipe.stages[first].settings, contexts[first])
    if distributed.is_main() and not (run_dir / RUN_FILE).is_file():
        atomic_write_json(run_dir / RUN_FILE, {"recipe": recipe.source, "model": spec, "finished": False, "stages": []})
    bundle, home = source, None
    results: list[StageResult] = []
    finished = True
    for i, stage in enumerate(recipe.stages, start=1):
        key, folder, ctx = keys[i - 1], stage_folder(run_dir, i, stage), contexts[i - 1]
        if i - 1 not in todo:
            results.append(StageResult(i, stage.name, folder.name, key, "reused", 0.0,
                                       json.loads((folder / STAGE_FILE).read_text()).get("report", {})))
            log(f"[{i}/{len(recipe.stages)}] {stage.name}: unchanged, reusing {folder}")
            bundle = None
            continue
        if bundle is None:
            bundle, home = stage_bundle(i - 1)
        log(f"[{i}/{len(recipe.stages)}] {stage.name} ...")
        t0 = time.monotonic()
        chosen = get_pass(stage.name)
        ctx.input_folder = None if home is None else run_dir / home
        if i - 1 != todo[0]:
            chosen.check(bundle, stage.settings, ctx)
        result = chosen.apply(bundle, stage.settings, ctx)
        seconds = round(time.monotonic() - t0, 2)
        if not result.finished:
            results.append(StageResult(i, stage.name, folder.name, key, "unfinished", seconds, result.report))
            log(f"[{i}/{len(recipe.stages)}] {stage.name}: unfinished after {seconds:.1f} s (time limit); "
                "rerun to resume")
            finished = False
            bundle = None
            break
        bundle = result.bundle
        if not result.unchanged:
            home = folder.name
            bundle.manifest.passes.append({"pass": stage.name, "settings": stage.settings_dict(),
                                           "report": result.report})
        if distributed.is_main():  # one process writes; the others hold the same Bundle in memory
            with atomic_dir(folder) as tmp:
                if not result.unchanged:
                    bundle.write_into(tmp)
                if result.artifacts is not None:
                    shutil.copytree(result.artifacts, tmp / ARTIFACTS)
                for log_file in sorted(ctx.work_dir.glob("*.jsonl")):  # training logs stay with the stage
                    shutil.copy2(log_file, tmp / log_file.name)
                atomic_write_json(tmp / STAGE_FILE, {"key": key, "pass": stage.name,
                                                     "settings": stage.settings_dict(), "weights": home,
                                                     "report": result.report, "seconds": seconds})
            _remove_work(ctx.work_dir)
        distributed.barrier()
        results.append(StageResult(i, stage.name, folder.name, key, "ran", seconds, result.report))
        log(f"[{i}/{len(recipe.stages)}] {stage.name}: done in {seconds:.1f} s")
    samples: list[str] = []
    if not distributed.is_main():
        return {"finished": finished, "stages": [r.__dict__ for r in results], "samples": samples}
    if finished and recipe.sample is not None:
        final = bundle if bundle is not None else stage_bundle(len(recipe.stages))[0]
        samples = _sample(final, recipe.sample, run_dir / "samples")
    summary = {"recipe": recipe.source, "model": spec, "teacher": teacher_spec, "run_dir": str(run_dir),
               "finished": finished, "stages": [r.__dict__ for r in results], "samples": samples}
    atomic_write_json(run_dir / RUN_FILE, summary)
    return summary


def _remove_work(work_dir: Path) -> None:
    """Drop a finished stage's checkpoints, and the .work folder once it is empty."""
    shutil.rmtree(work_dir, ignore_errors=True)
    if work_dir.parent.is_dir() and not any(work_dir.parent.iterdir()):
        work_dir.parent.rmdir()


def _text_states_components(bundle: Bundle) -> Any:
    """On a host without the text encoder's weights, components reading `$POCKETDIFF_TEXT_STATES`."""
    if bundle.text_encoder is not None or not os.environ.get("POCKETDIFF_TEXT_STATES"):
        return None
    from .sampler import CachedTextComponents
    from .teacher.train import caption_table

    return CachedTextComponents(bundle, caption_table(Path(os.environ["POCKETDIFF_TEXT_STATES"])))


def _sample(bundle: Bundle, settings: SampleSettings, out: Path) -> list[str]:
    """Sample the final Bundle with the recipe's [sample] settings (the Bundle's own where unset) into `out`."""
    from .sampler import SampleConfig, generate, save_pngs

    bundle.to("cpu", torch.float32)  # the reference sampler runs in fp32 on the host
    cfg = SampleConfig.for_bundle(bundle, steps=settings.steps, scheduler=settings.scheduler,
                                  guidance_scale=settings.guidance_scale, negative_prompt=settings.negative_prompt,
                                  seed=settings.seed)
    images = generate(bundle, settings.prompts, cfg, components=_text_states_components(bundle), progress=True)
    with atomic_dir(out) as tmp:
        return [str(out / name) for name in save_pngs(images, tmp, cfg.seed)]

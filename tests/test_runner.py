"""`run`: stages written atomically, unchanged stages reused, an interrupted run resumable."""

import json
from dataclasses import dataclass

import pytest
from safetensors import safe_open

from pocketdiff.bundle import Bundle
from pocketdiff.passes import register_pass
from pocketdiff.recipe import load_recipe
from pocketdiff.runner import RUN_FILE, STAGE_FILE, run_recipe

RECIPE = """
model = "arch:tiny"
[[pass]]
name = "scheduler"
kind = "euler"
[[pass]]
name = "{second}"
{setting}
[sample]
prompts = ["a photo of a bag"]
steps = 2
scheduler = "euler"
guidance_scale = 2.0
"""


@register_pass
class _Interrupt:
    """Stands for a user pressing Ctrl-C in the middle of a stage."""

    name = "test-interrupt"

    @dataclass
    class Settings:
        pass

    def check(self, bundle, settings, ctx):
        pass

    def apply(self, bundle, settings, ctx):
        raise KeyboardInterrupt


def _recipe(tmp_path, second="cast", setting='dtype = "float16"'):
    path = tmp_path / f"r-{second}-{abs(hash(setting))}.toml"
    path.write_text(RECIPE.format(second=second, setting=setting))
    return load_recipe(path)


def _statuses(summary):
    return [s["status"] for s in summary["stages"]]


def test_rerun_reuses_unchanged_stages_and_redoes_changed_ones(tmp_path):
    run = tmp_path / "run"
    first = run_recipe(_recipe(tmp_path), run)
    assert _statuses(first) == ["ran", "ran"]
    assert len(first["samples"]) == 1 and all((run / "samples").iterdir())
    with safe_open(str(next((run / "02-cast" / "unet").glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    cast = Bundle.load(run / "02-cast")
    assert [p["pass"] for p in cast.manifest.passes] == ["scheduler", "cast"]

    assert _statuses(run_recipe(_recipe(tmp_path), run)) == ["reused", "reused"]
    changed = run_recipe(_recipe(tmp_path, setting='dtype = "bfloat16"'), run)
    assert _statuses(changed) == ["reused", "ran"]


def test_interrupted_stage_leaves_finished_stages_and_nothing_half_written(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_recipe(tmp_path, second="test-interrupt", setting=""), run)
    assert sorted(p.name for p in run.iterdir()) == ["01-scheduler", RUN_FILE]  # run.json: marked as a run
    assert (run / "01-scheduler" / STAGE_FILE).is_file()
    assert json.loads((run / RUN_FILE).read_text())["finished"] is False
    resumed = run_recipe(_recipe(tmp_path), run)
    assert _statuses(resumed) == ["reused", "ran"]


def test_stage_without_commit_marker_is_redone(tmp_path):
    run = tmp_path / "run"
    run_recipe(_recipe(tmp_path), run)
    (run / "02-cast" / STAGE_FILE).unlink()
    assert _statuses(run_recipe(_recipe(tmp_path), run)) == ["reused", "ran"]

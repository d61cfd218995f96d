"""Export and validation as recipe stages: artifacts kept in the stage folder, the Bundle passed through
(no second copy of the weights), reruns reuse them, and a recipe whose stages do not fit fails first."""

import json
import shutil

import pytest

from pocketdiff.errors import RecipeError
from pocketdiff.recipe import load_recipe
from pocketdiff.report import ReportConfig, build_report
from pocketdiff.runner import STAGE_FILE, run_recipe

RECIPE = """
model = "arch:tiny"
[[pass]]
name = "scheduler"
kind = "euler"
{stages}
[sample]
prompts = ["a photo of a bag"]
steps = 2
scheduler = "euler"
guidance_scale = 2.0
"""
EXPORT_VALIDATE = """
[[pass]]
name = "export"
targets = ["onnx"]
batch_sizes = [1]
[[pass]]
name = "validate"
steps = 2
"""


def _recipe(tmp_path, stages):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(stages=stages))
    return load_recipe(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run of scheduler -> export -> validate on arch:tiny: (recipe folder, run folder, summary)."""
    tmp = tmp_path_factory.mktemp("stages")
    return tmp, tmp / "run", run_recipe(_recipe(tmp, EXPORT_VALIDATE), tmp / "run")


def test_export_and_validate_stages_keep_artifacts_and_pass_the_bundle_through(exported):
    tmp_path, run, summary = exported
    assert [s["status"] for s in summary["stages"]] == ["ran", "ran", "ran"] and summary["finished"]
    export, checked = run / "02-export", run / "03-validate"
    assert not (export / "unet").exists() and not (checked / "unet").exists()  # no second copy of the weights
    assert json.loads((export / STAGE_FILE).read_text())["weights"] == "01-scheduler"
    manifest = json.loads((export / "artifacts" / "artifacts.json").read_text())
    assert {a["component"] for a in manifest["artifacts"]} == {"text_encoder", "unet", "vae_decoder"}
    assert all((export / "artifacts" / a["path"]).is_file() for a in manifest["artifacts"])
    report = json.loads((checked / "artifacts" / "validation.json").read_text())
    assert report["passed"] and report["steps"] == 2
    psnr = summary["stages"][2]["report"]["targets"]["onnx"]["psnr_db"]
    assert psnr is not None and psnr > report["targets"][0]["gate_db"]
    assert len(summary["samples"]) == 1  # sampled from the passed-through Bundle
    again = run_recipe(_recipe(tmp_path, EXPORT_VALIDATE), run)
    assert [s["status"] for s in again["stages"]] == ["reused"] * 3 and len(again["samples"]) == 1


def test_report_puts_the_stages_figures_on_the_model_they_measured(exported):
    _, run, _ = exported
    report = build_report(run, ReportConfig(images=False))
    assert [r["id"] for r in report["rows"]] == ["teacher", "01-scheduler"]  # export/validate are no models
    row = report["rows"][1]
    assert row["parity"]["onnx"]["status"] == "passed" and row["parity"]["onnx"]["psnr_db"] > 90
    assert report["unattributed"] == []


def test_validate_without_an_export_stage_fails_before_any_work(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('model = "arch:tiny"\n[[pass]]\nname = "validate"\n')
    with pytest.raises(RecipeError, match="needs an 'export' stage before it"):
        run_recipe(load_recipe(path), tmp_path / "run")
    assert not (tmp_path / "run" / "01-validate").exists()


@pytest.mark.parametrize("line, message", [("targets = []", "targets must list"),
                                           ('targets = ["tflite"]', "targets"),
                                           ("batch_sizes = [0]", "at least 1")])
def test_bad_export_settings_are_refused_when_the_recipe_is_read(tmp_path, line, message):
    path = tmp_path / "r.toml"
    path.write_text(f'model = "arch:tiny"\n[[pass]]\nname = "export"\n{line}\n')
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_profile_stage_keeps_its_report_and_refuses_a_foreign_against_folder(exported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported[1], run)  # the export stage is reused: only the profile stage runs
    stages = EXPORT_VALIDATE.replace('name = "validate"\nsteps = 2', 'name = "profile"\nblocks = 1\nper_block = 1')
    summary = run_recipe(_recipe(tmp_path, stages), run)
    assert [s["status"] for s in summary["stages"]] == ["reused", "reused", "ran"]
    profile = json.loads((run / "03-profile" / "artifacts" / "profile.json").read_text())
    timed = summary["stages"][2]["report"]["median_ms"]["onnx"]
    assert set(timed) >= {"unet", "vae_decoder"} and all(ms > 0 for ms in timed.values())
    assert profile["profiles"]["A"]["targets"]["onnx"]["components"]["unet"]["median_ms"] == timed["unet"]
    bad = stages + f'against = "{tmp_path}"\n'
    with pytest.raises(RecipeError, match="not a folder written by `pocketdiff export`"):
        run_recipe(_recipe(tmp_path, bad), tmp_path / "run2")

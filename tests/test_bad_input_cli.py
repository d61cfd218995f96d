"""Bad input at the CLI layer: output paths, file modes, signals, one-line errors, values checked when read,
data checked before sampling, FID on the 8-bit images users save."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pocketdiff import cli
from pocketdiff.bundle import Bundle
from pocketdiff.commands.model import GENERATE_FALLBACK, IMAGES_MANIFEST
from pocketdiff.errors import ConfigError, InputPathError
from pocketdiff.fileio import atomic_dir, atomic_write_bytes, json_text, prepare_output_dir, prepare_output_file
from pocketdiff.sampler import SampleConfig, generate, to_pil


@pytest.fixture
def run_cli(capsys, monkeypatch, tmp_path):
    """Call `pocketdiff ARGS` in this process from `tmp_path`: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)

    def call(*argv: str) -> tuple[int, str, str]:
        with warnings.catch_warnings():
            code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return call


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("pocketdiff:")]
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporary names pocketdiff's atomic writes use, anywhere under `folder`."""
    return [str(p) for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def test_export_refuses_a_folder_that_is_not_an_export_and_keeps_its_files(run_cli, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    code, _, err = run_cli("export", "arch:tiny", "--out", "photos")
    line = _one_line_error(err)
    assert code == 2 and "--out" in line and "--overwrite" in line and "artifacts.json" in line
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["holiday.jpg"]


@pytest.mark.parametrize("out", [".", "..", "{tmp}", "a_file", "link", "/sys/pocketdiff-out", "a_file/sub"])
def test_output_paths_refused_before_any_work(run_cli, tmp_path, out):
    if out.startswith("/sys") and not os.path.isdir("/sys"):
        pytest.skip("needs a read-only /sys")
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    code, _, err = run_cli("export", "arch:tiny", "--out", out.format(tmp=tmp_path))
    assert code == 2 and "--out" in _one_line_error(err)
    assert (tmp_path / "a_file").read_text() == "keep me" and (tmp_path / "link").is_symlink()
    assert _leftovers(tmp_path) == []


def test_unwritable_report_refused_before_validation(run_cli, tmp_path, monkeypatch):
    import pocketdiff.runtimes.harness as harness

    monkeypatch.setattr(harness, "validate", lambda *a, **k: pytest.fail("validation ran before --report was checked"))
    (tmp_path / "art").mkdir()
    code, _, err = run_cli("validate", "art", "--report", "art")
    assert code == 2 and "--report" in _one_line_error(err) and "folder" in err
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InputPathError, match="--report .*a_file is a file"):
        prepare_output_file(tmp_path / "a_file" / "r.json", "--report")


def test_generate_reuses_its_own_folder_and_replaces_others_only_with_overwrite(run_cli, tmp_path):
    args = ("generate", "arch:tiny", "-p", "x", "--steps", "1", "--json")
    code, out, _ = run_cli(*args, "--out", "imgs")
    assert code == 0 and json.loads(out)["images"] == [str(Path("imgs") / "0000_seed0.png")]
    assert (tmp_path / "imgs" / IMAGES_MANIFEST).is_file()
    code, _, _ = run_cli(*args, "-n", "2", "--out", "imgs")
    assert code == 0 and sorted(p.name for p in (tmp_path / "imgs").glob("*.png")) == ["0000_seed0.png",
                                                                                       "0001_seed1.png"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    code, _, err = run_cli(*args, "--out", "mine")
    assert code == 2 and (tmp_path / "mine" / "notes.txt").exists()
    code, _, _ = run_cli(*args, "--out", "mine", "--overwrite")
    assert code == 0 and not (tmp_path / "mine" / "notes.txt").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            atomic_write_bytes(tmp / "config.json", b"{}")
        atomic_write_bytes(tmp_path / "report.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == file_mode


def test_atomic_dir_never_turns_a_file_into_a_folder_nor_leaves_old_copies(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"weights")
    with pytest.raises(InputPathError, match="is a file"):
        with atomic_dir(tmp_path / "model.bin"):
            pytest.fail("the body must not run")
    assert (tmp_path / "model.bin").read_bytes() == b"weights"
    for content in (b"one", b"two"):
        with atomic_dir(tmp_path / "art") as tmp:
            (tmp / "f").write_bytes(content)
    assert (tmp_path / "art" / "f").read_bytes() == b"two"
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "art") as tmp:
            (tmp / "f").write_bytes(b"half")
            raise RuntimeError("stage failed")
    assert (tmp_path / "art" / "f").read_bytes() == b"two" and _leftovers(tmp_path) == []


def test_atomic_dir_sweeps_what_a_killed_process_left_and_restores_a_half_swap(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".art.tmp-{dead.pid}-x1").mkdir()
    (tmp_path / f".art.old-{dead.pid}").mkdir()
    (tmp_path / f".art.old-{dead.pid}" / "f").write_bytes(b"previous")
    alive = tmp_path / f".art.tmp-{os.getpid()}-busy"
    alive.mkdir()
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "art"):
        raise RuntimeError("this attempt fails too")
    assert (tmp_path / "art" / "f").read_bytes() == b"previous"  # killed between the two renames: restored
    assert not (tmp_path / f".art.tmp-{dead.pid}-x1").exists() and alive.is_dir()  # a live writer's is kept


def test_prepare_output_dir_accepts_new_empty_and_same_kind_folders(tmp_path):
    assert prepare_output_dir(tmp_path / "new" / "deeper", "artifacts.json") == tmp_path / "new" / "deeper"
    (tmp_path / "empty").mkdir()
    prepare_output_dir(tmp_path / "empty", "artifacts.json")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "artifacts.json").write_text("{}")
    (tmp_path / "earlier" / "onnx").mkdir()
    prepare_output_dir(tmp_path / "earlier", "artifacts.json")
    with pytest.raises(InputPathError, match="run.json"):
        prepare_output_dir(tmp_path / "earlier", "run.json")
    prepare_output_dir(tmp_path / "earlier", "run.json", overwrite=True)


@pytest.mark.parametrize("argv, flag", [
    (["generate", "arch:tiny", "-p", "x", "--guidance-scale", "nan"], "--guidance-scale"),
    (["generate", "arch:tiny", "-p", "x", "--guidance-scale", "-1"], "--guidance-scale"),
    (["generate", "arch:tiny", "-p", "x", "--guidance-scale", "inf"], "--guidance-scale"),
    (["generate", "arch:tiny", "-p", "x", "--height", "0"], "--height"),
    (["generate", "arch:tiny", "-p", "x", "--width", "-64"], "--width"),
    (["generate", "arch:tiny", "-p", "x", "--height", "65536"], "--height"),
    (["generate", "arch:tiny", "-p", "x", "--seed", str(2**70)], "--seed"),
    (["generate", "arch:tiny", "-p", "x", "--seed", "-1"], "--seed"),
    (["generate", "arch:tiny", "-p", "x", "--steps", "0"], "--steps"),
    (["generate", "arch:tiny", "-p", "x", "--batch-size", "0"], "--batch-size"),
    (["generate", "arch:tiny", "-p", "x", "-n", "0"], "--num-images"),
    (["eval", "arch:tiny", "--samples", "-3"], "--samples"),
    (["eval", "arch:tiny", "--reference-samples", "0"], "--reference-samples"),
    (["eval", "arch:tiny", "--reference-samples", "20000"], "--reference-samples"),
    (["eval", "arch:tiny", "--samples", "70000"], "--samples"),
    (["info", "arch:tiny", "--resolution", "0"], "--resolution"),
    (["info", "arch:tiny", "--resolution", "100000"], "--resolution"),
    (["export", "arch:tiny", "--out", "o", "--batch-sizes", "0"], "--batch-sizes"),
    (["export", "arch:tiny", "--out", "o", "--resolutions", "99999"], "--resolutions"),
    (["export", "arch:tiny", "--out", "o", "--targets", "onnx,onnx"], "--targets"),
    (["validate", "art", "--steps", "0"], "--steps"),
])
def test_out_of_range_values_are_one_line_exit_2_naming_the_flag(run_cli, argv, flag):
    code, _, err = run_cli(*argv)
    assert code == 2 and flag in _one_line_error(err)


def test_sampling_values_checked_in_the_python_api(tiny):
    bundle = tiny
    for bad in ({"guidance_scale": float("inf")}, {"seed": 2**63}, {"height": 0}, {"steps": 0}, {"batch_size": 0},
                {"scheduler": "ddpm"}, {"steps": 2.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SampleConfig(**bad)
    with pytest.raises(ConfigError, match="at most|between 1 and 50"):
        generate(bundle, ["x"], SampleConfig(scheduler="lcm", steps=51), progress=False)
    with pytest.raises(ConfigError, match="seed"):
        generate(bundle, ["x", "y"], SampleConfig(steps=1, seed=2**63 - 1), progress=False)


def test_a_model_samples_with_its_own_settings_unless_flags_say_otherwise(tiny, tmp_path, run_cli):
    assert SampleConfig.for_bundle(tiny, fallback=GENERATE_FALLBACK).guidance_scale == 7.5
    tiny.save(tmp_path / "teacher")
    bundle = Bundle.load(tmp_path / "teacher")
    bundle.manifest.sampling = {"scheduler": "lcm", "steps": 2, "guidance_scale": 1.0}
    bundle.save(tmp_path / "student")
    code, out, _ = run_cli("generate", tmp_path / "student", "-p", "x", "--json", "--out", "s")
    assert code == 0 and {k: json.loads(out)["sampling"][k] for k in ("scheduler", "steps", "guidance_scale")} == \
        {"scheduler": "lcm", "steps": 2, "guidance_scale": 1.0}
    code, out, _ = run_cli("generate", tmp_path / "student", "-p", "x", "--json", "--out", "s", "--steps", "3")
    assert code == 0 and json.loads(out)["sampling"]["steps"] == 3


def test_usage_errors_are_one_line_and_json_failures_are_json(run_cli):
    code, out, err = run_cli("generate", "--steps", "x")
    assert code == 2 and "--help" in _one_line_error(err) and out == ""
    code, out, err = run_cli("info", "nowhere", "--json")
    assert code == 2 and json.loads(out)["error"]["kind"] == "InputPathError"
    assert json.loads(out)["error"]["exit_code"] == 2 and "nowhere" in json.loads(out)["error"]["message"]
    code, out, _ = run_cli("bogus-command", "--json")
    assert code == 2 and json.loads(out)["error"]["kind"] == "UsageError"


def test_json_output_is_strict_with_null_for_nan():
    text = json_text({"psnr_db": float("nan"), "gate": float("inf"), "x": [np.float32("nan"), np.int64(3)]})
    assert json.loads(text) == {"psnr_db": None, "gate": None, "x": [None, 3]}


def test_eval_with_wrong_data_fails_before_sampling(run_cli, monkeypatch, tmp_path):
    import pocketdiff.evaluate as ev

    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("sampled before checking --data"))
    code, _, err = run_cli("eval", "arch:tiny", "--data", tmp_path / "nope", "--samples", "2")
    assert code == 2 and "nope" in _one_line_error(err)


def _write_idx(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    header = b"\0\0\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    (folder / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes())
    labels = np.zeros(len(images), np.uint8)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + len(labels).to_bytes(4, "big") + labels.tobytes())


def test_reference_feature_cache_is_keyed_on_the_data_used(tmp_path, monkeypatch):
    import pocketdiff.evaluate as ev

    monkeypatch.setenv("POCKETDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ev, "inception_features", lambda images, net: images.mean(dim=(1, 2, 3)).double().numpy())
    _write_idx(tmp_path / "a", np.zeros((4, 28, 28), np.uint8))
    _write_idx(tmp_path / "b", np.full((4, 28, 28), 200, np.uint8))
    a = ev.reference_features("test", None, 4, tmp_path / "a")
    b = ev.reference_features("test", None, 4, tmp_path / "b")
    assert not np.allclose(a, b)
    with pytest.raises(ConfigError, match="at most 4"):
        ev.reference_features("test", None, 5, tmp_path / "a")


def test_fid_scores_the_8bit_images_a_user_saves(tmp_path, monkeypatch):
    import pocketdiff.evaluate as ev
    from pocketdiff.metrics.classifier import load_classifier
    from pocketdiff.metrics.fid import load_inception

    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for i, img in enumerate(to_pil(images)):
        img.save(tmp_path / f"{i}.png")
    saved = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / f"{i}.png"))).permute(2, 0, 1)
                         for i in range(3)]).float() / 255
    assert not torch.equal(saved, images)
    monkeypatch.setattr(ev, "fid_from_features", lambda a, b: float(a.sum()))  # sqrtm of 2048^2: slow, not at issue
    yard = ev.Yardstick(load_inception(), load_classifier(), np.random.default_rng(0).normal(size=(8, 2048)))
    np.testing.assert_equal(yard.score(images, [0, 1, 2]), yard.score(saved, [0, 1, 2]))


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pocketdiff", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_sigterm_while_sampling_leaves_nothing_and_no_traceback(tmp_path):
    proc = _start(["generate", "arch:tiny", "-p", "x", "--steps", "1000", "--out", "imgs"], tmp_path)
    seen = b""
    while b"ddim x1000" not in seen:  # the progress bar: sampling has started
        chunk = proc.stderr.read1(4096)
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    err = (seen + proc.stderr.read()).decode(errors="replace")
    assert proc.wait() == 143 and "Traceback" not in err and "generate terminated" in err, err
    assert "stages" not in err and list(tmp_path.iterdir()) == []


def test_ctrl_c_during_imports_is_one_line_exit_130(tmp_path):
    proc = _start(["info", "arch:tiny"], tmp_path)
    time.sleep(0.5)  # torch and diffusers take seconds to import
    proc.send_signal(signal.SIGINT)
    err = proc.communicate()[1].decode(errors="replace")
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().startswith("pocketdiff: stopped:"), err

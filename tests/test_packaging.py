"""A regular (non-editable) wheel install carries every module, the shipped weights and recipes."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tracked_copy(dest: Path) -> Path:
    """The tracked files as they are in the working tree: setuptools builds inside the source folder
    (build/), so building from the checkout itself would leave state there and could package stale files."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_wheel_installs_and_runs(tmp_path):
    source = _tracked_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("pocketdiff-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "pocketdiff", "compress", "export", "runtimes"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    modules = {n if n.startswith("pocketdiff/") else f"pocketdiff/{n}" for n in tracked if n.endswith(".py")}
    assert not modules - names, f"tracked modules missing from the wheel (pyproject's packages): {modules - names}"
    for expected in ("pocketdiff/cli.py", "pocketdiff/export/base.py", "pocketdiff/export/rewrites/attention.py",
                     "pocketdiff/export/rewrites/winograd_table.py", "pocketdiff/runtimes/base.py",
                     "pocketdiff/compress/__init__.py", "pocketdiff/recipes/default.toml",
                     "pocketdiff/weights/classifier.safetensors", "pocketdiff/runtimes/devices.json",
                     "pocketdiff/weights/fashion/unet/diffusion_pytorch_model.safetensors"):
        assert expected in names, expected
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import pocketdiff; print(pocketdiff.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))
    out = subprocess.run([sys.executable, "-m", "pocketdiff", "info", "fashion", "--json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    unet = next(c for c in json.loads(out.stdout)["components"] if c["component"] == "unet")
    assert unet["params"] > 1_000_000

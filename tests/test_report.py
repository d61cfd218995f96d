"""`pocketdiff report`: the page and its JSON agree, show only measured figures, need no network, and bad input
writes nothing."""

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pocketdiff.bundle import Bundle
from pocketdiff.cli import main
from pocketdiff.costs import measure_costs
from pocketdiff.recipe import load_recipe
from pocketdiff.report import ReportConfig, write_report
from pocketdiff.runner import RunOptions, run_recipe

TINY_RECIPE = """model = "arch:tiny"

[[pass]]
name = "scheduler"
kind = "dpmsolver++"

[[pass]]
name = "cast"
dtype = "float16"
components = ["unet", "vae"]
"""
ONE_PROMPT = ("a photo of a sneaker",)
FEW_STEPS = {"steps": 2, "scheduler": "dpmsolver++", "guidance_scale": 4.0}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A two-stage run of arch:tiny, with an export of its last stage, that export's validation and profile,
    and an eval of the last stage, as the real commands lay them out (figures are small hand-made JSON)."""
    root = tmp_path_factory.mktemp("report")
    (root / "tiny.toml").write_text(TINY_RECIPE)
    run = root / "run"
    run_recipe(load_recipe(root / "tiny.toml"), run, options=RunOptions(progress=False))
    last = run / "02-cast"
    export = run / "export"
    (export / "onnx").mkdir(parents=True)
    (export / "onnx" / "unet.onnx").write_bytes(b"\0" * 1_500_000)
    (export / "artifacts.json").write_text(json.dumps({
        "model": str(last), "model_hash": Bundle.load(last).manifest.content_hash, "sampler": {}, "quantization": None,
        "artifacts": [{"target": "onnx", "component": "unet", "path": "onnx/unet.onnx", "precision": "fp32",
                       "inputs": {}, "outputs": {}}]}))
    (run / "validate.json").write_text(json.dumps({
        "folder": str(export), "passed": True, "failed": [],
        "targets": [{"target": "onnx", "status": "passed", "psnr_db": 96.5, "gate_db": 90.0,
                     "components": {"unet": {"rel_l2": 2e-6, "gate_rel_l2": 3e-5}}}]}))
    (run / "export.profile.json").write_text(json.dumps({"method": {"blocks": 4, "per_block": 2}, "profiles": {"A": {
        "folder": str(export), "model": str(last),
        "targets": {"onnx": {"status": "measured", "memory": {"peak_rss_mb": 310.0},
                             "components": {"unet": {"median_ms": 0.42, "p90_ms": 0.5}},
                             "image": {"median_ms": 12.5, "p90_ms": 13.1, "sampler": {"steps": 2}}}},
        "estimates": [{"device": "a17", "name": "iPhone 15 Pro (A17 Pro ANE)", "image_ms": 3.25,
                       "calibration_error_pct": 8.4, "memory": {"needed_mb": 21.0, "fits": True}}]}}}))
    (run / "quality").mkdir()
    cell = {"kid": 0.01, "prompt_accuracy": 0.9, "samples": 1000, "scheduler": "dpmsolver++", "guidance_scale": 4.0}
    (run / "quality" / "student_quality.json").write_text(json.dumps({"cells": [
        {**cell, "name": "teacher dpmsolver++ 25 g=4", "fid": 7.5, "steps": 25},
        {**cell, "name": "run/02-cast 4 steps g=4.0", "fid": 9.25, "steps": 4},
        {**cell, "name": "other/01-x 4 steps g=4.0", "fid": 30.0, "steps": 4}]}))
    (last / "eval.json").write_text(json.dumps({"fid": 40.5, "prompt_accuracy": 0.61, "samples": 100, "steps": 2,
                                                "scheduler": "dpmsolver++", "guidance_scale": 4.0}))
    return run


@pytest.fixture(scope="module")
def report(tiny_run):
    """The report of tiny_run with one prompt sampled per model."""
    return write_report(tiny_run, config=ReportConfig(prompts=ONE_PROMPT, sampling=FEW_STEPS))


class _Tables(HTMLParser):
    """The text of every cell of every table, by table id."""

    def __init__(self):
        super().__init__()
        self.tables, self.current, self.cell = {}, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.current = self.tables.setdefault(dict(attrs).get("id"), [])
        elif tag == "tr":
            self.current.append([])
        elif tag in ("td", "th"):
            self.cell = ""
        elif tag == "br" and self.cell is not None:
            self.cell += "; "

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.current[-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def _tables(html: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(html)
    return parser.tables


def test_every_stage_is_in_the_table_with_its_measured_params(report, tiny_run):
    html = Path(report["html"]).read_text()
    head, *lines = _tables(html)["stages"]
    rows = {line[0]: dict(zip(head, line)) for line in lines}
    assert list(rows) == ["teacher (arch:tiny)", "01-scheduler", "02-cast"]
    for stage in ("01-scheduler", "02-cast"):
        params = sum(c.params for c in measure_costs(Bundle.load(tiny_run / stage)))
        assert rows[stage]["params"] == f"{params:,}"
        assert rows[stage]["U-Net GMACs/call"] != "not measured"
    cast = rows["02-cast"]
    assert cast["latency ms/image"] == "onnx, 2 steps: 12.5"
    assert cast["FID"] == "dpmsolver++ x4, n=1000: 9.25; dpmsolver++ x2, n=100: 40.50"
    assert rows["teacher (arch:tiny)"]["FID"] == "dpmsolver++ x25, n=1000: 7.50"
    assert cast["parity vs PyTorch"] == "onnx: passed, 96.5 dB"
    for figure in ("latency ms/image", "parity vs PyTorch"):  # nothing invented
        assert rows["teacher (arch:tiny)"][figure] == rows["01-scheduler"][figure] == "not measured"
    assert rows["01-scheduler"]["FID"] == rows["01-scheduler"]["prompt accuracy"] == "not measured"
    assert rows["teacher (arch:tiny)"]["weights on disk MB"] == "not measured"  # arch:tiny has no files
    unet = (tiny_run / "02-cast" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert f"unet: {unet / 1e6:.1f}" in rows["02-cast"]["weights on disk MB"]


def test_json_and_html_agree(report, tiny_run):
    data = json.loads(Path(report["json"]).read_text())
    tables = _tables(Path(report["html"]).read_text())
    shown = {line[0]: line for line in tables["stages"][1:]}
    for row in data["rows"]:
        assert shown[row["label"]][2] == f"{row['params']:,}"
    assert data["rows"][2]["latency"]["onnx"]["peak_rss_mb"] == 310.0
    assert data["points"] == [{"model": "02-cast", "runtime": "onnx", "steps": 2, "image_ms": 12.5, "fid": 40.5,
                               "prompt_accuracy": 0.61}]
    assert tables["estimates"][1][1:3] == ["iPhone 15 Pro (A17 Pro ANE)", "3.2"]
    assert tables["exports"][1][-1] == "1.50"
    assert data["unattributed"] == [f"{tiny_run / 'quality' / 'student_quality.json'}: other/01-x 4 steps g=4.0"]


def test_page_is_self_contained(report):
    html = Path(report["html"]).read_text()
    assert not re.search(r"https?:|<script|<link|@import|url\(", html, re.I)
    assert re.findall(r'<img [^>]*src="([^"]+)"', html) and all(
        src.startswith("data:image/png;base64,") for src in re.findall(r'<img [^>]*src="([^"]+)"', html))
    assert html.count("<svg") == 3 and html.count("<circle") == 2 + 3  # one point per latency plot, 3 FID-steps


def test_images_use_the_same_prompts_and_seeds(report):
    rows = {r["id"]: r for r in json.loads(Path(report["json"]).read_text())["rows"]}
    assert all(len(r["images"]) == len(ONE_PROMPT) and r["sampling"] == {**FEW_STEPS, "seed": 0} for r in rows.values())
    # the scheduler stage changes no weight and samples as the teacher does: the same seeds give the same image
    assert rows["teacher"]["images"] == rows["01-scheduler"]["images"]
    assert base64.b64decode(rows["02-cast"]["images"][0]).startswith(b"\x89PNG")


def test_bad_input_exits_2_and_writes_nothing(tiny_run, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    out = ["--out", str(tmp_path / "r.html")]
    for args, says in ((["report", str(tmp_path / "plain")], "no run.json"),
                       (["report", str(tmp_path / "missing")], "no run.json"),
                       (["report", str(tmp_path / "plain"), *out], "no run.json"),
                       (["report", str(tiny_run), *out, "--figures", str(tmp_path / "none")], "no such file")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pocketdiff: error: ") and says in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["plain"]


def test_failed_render_writes_nothing(tiny_run, tmp_path, monkeypatch):
    import pocketdiff.report_html

    def broken(report):
        raise RuntimeError("render failed")

    monkeypatch.setattr(pocketdiff.report_html, "render", broken)
    with pytest.raises(RuntimeError):
        write_report(tiny_run, tmp_path / "r.html", ReportConfig(images=False))
    assert list(tmp_path.iterdir()) == []


CHROMIUM = next((shutil.which(n) for n in ("chromium-headless-shell", "chromium") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium-headless-shell or chromium binary on PATH "
                                              "(Debian: apt-get install chromium-headless-shell)")
def test_chromium_renders_the_page_with_no_network(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    offline = ["--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
    dom = subprocess.run([CHROMIUM, *offline, "--dump-dom", Path(report["html"]).as_uri()], capture_output=True,
                         text=True, timeout=60).stdout
    assert "02-cast" in dom and "not measured" in dom
    subprocess.run([CHROMIUM, *offline, f"--screenshot={shot}", "--window-size=1200,900", Path(report["html"]).as_uri()],
                   capture_output=True, timeout=60, check=True)
    assert len(Image.open(shot).convert("RGB").getcolors(1 << 20)) > 50  # drawn, not a blank page

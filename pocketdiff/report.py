"""The run report: one self-contained HTML page and its JSON for a `pocketdiff run` folder.

Per model (the teacher, then each stage): parameters and MACs per call (`costs.measure_costs`), weights on
disk, images for the same prompts and seeds, and the figures found in the run folder (and any `figures`
paths): exports (artifacts.json), validation reports, `pocketdiff profile` JSON (latency per runtime,
device estimates) and quality JSON (`pocketdiff eval --json`, `bench/student_quality.py`). A figure is
tied to a model by what it records (an export's weights hash, a profile's or validation's export folder,
a quality cell's name, an eval file inside a stage folder); nothing is computed that was not measured,
and a figure absent is null in the JSON and "not measured" on the page (`report_html`).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle import Bundle, read_json
from .errors import InputPathError
from .fileio import atomic_write_bytes, json_text
from .runner import STAGE_FILE, weights_folder

REPORT_FILE = "report.html"
# Images of a model that records no sampling settings of its own: the teacher's best cell (DPM-Solver++ 25,
# g = 4; docs/BENCHMARKS.md), as `bench/student_quality.py` samples such a model.
SAMPLING_FALLBACK = {"steps": 25, "scheduler": "dpmsolver++", "guidance_scale": 4.0}
# JSON files of a run folder that are never figures: Bundles' own files and the run's bookkeeping.
_NOT_FIGURES = {"run.json", "stage.json", "pocketdiff.json", "model_index.json", "config.json", "report.json",
                "images.json"}


@dataclass
class ReportConfig:
    """What the report samples and where else it looks for figures."""

    prompts: tuple[str, ...] = ("a photo of a sneaker", "a photo of a dress", "ankle boot, product shot",
                                "a photo of a bag")
    seed: int = 0
    images: bool = True
    sampling: dict[str, Any] = field(default_factory=lambda: dict(SAMPLING_FALLBACK))  # for a model with none
    figures: tuple[Path, ...] = ()  # files or folders of figures kept outside the run folder


def read_run(run_dir: Path) -> dict[str, Any]:
    """The run folder's run.json; InputPathError when `run_dir` is not a `pocketdiff run` folder."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise InputPathError(f"{run_dir}: not a pocketdiff run folder (no run.json); make one with `pocketdiff run`")
    run = read_json(path)
    if not isinstance(run, dict) or not isinstance(run.get("stages"), list):
        raise InputPathError(f"{path}: not a pocketdiff run summary (no \"stages\" list); rerun `pocketdiff run`")
    return run


def _same(a: str | Path, b: Path) -> bool:
    return Path(a).resolve() == b.resolve()


def _model_rows(run_dir: Path, run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model: the teacher, then each stage run.json lists, with its folder when written. A stage
    that kept its input model (export, validate, profile) is no model of its own: its files are figures."""
    teacher = run.get("teacher") or run.get("model")
    rows = [{"id": "teacher", "label": f"teacher ({teacher})", "spec": teacher, "status": "source"}]
    for s in run["stages"]:
        folder = run_dir / s["folder"]
        written = s["status"] != "unfinished" and (folder / STAGE_FILE).is_file()
        if written and weights_folder(folder) != folder.name:
            continue
        rows.append({"id": s["folder"], "label": s["folder"], "spec": str(folder) if written else None,
                     "status": s["status"] if written else "not written", "seconds": s.get("seconds")})
    return rows


def _folder_of(spec: str) -> Path | None:
    """Where a model's files lie: a built-in's package folder, a path as given; None for arch:NAME."""
    from .zoo import BUILTIN_MODELS, builtin_path

    if spec in BUILTIN_MODELS:
        return builtin_path(spec)
    return Path(spec) if Path(spec).exists() else None


def _disk_bytes(path: Path | None, pattern: str = "*") -> int | None:
    """Bytes on disk of a file, or of a folder's files matching `pattern`; None when there are none."""
    if path is None or not path.exists():
        return None
    files = [path] if path.is_file() else [f for f in path.rglob(pattern) if f.is_file()]
    return sum(f.stat().st_size for f in files) or None


def _png_b64(images: Any) -> list[str]:
    from .sampler import to_pil

    out = []
    for img in to_pil(images):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def _measure(row: dict[str, Any], config: ReportConfig) -> None:
    """Costs, weights on disk and (when asked) images of one row's model, in place."""
    import torch

    from .costs import measure_costs
    from .sampler import SampleConfig, generate
    from .sources import load_model

    bundle: Bundle = load_model(row["spec"])
    row["content_hash"] = bundle.manifest.content_hash
    costs = measure_costs(bundle)
    row["resolution"] = bundle.resolution
    row["components"] = {c.component: {"params": c.params, "macs": c.macs, "weight_macs": c.weight_macs}
                         for c in costs}
    row["params"] = sum(c.params for c in costs)
    folder = _folder_of(row["spec"])  # per component: a built-in's text encoder is packaged apart
    row["weights_bytes"] = {c: _disk_bytes(folder / c, "*.safetensors") for c in ("text_encoder", "unet", "vae")
                            if folder is not None and _disk_bytes(folder / c, "*.safetensors")}
    if config.images and bundle.text_encoder is not None:
        bundle.to("cpu", torch.float32)  # the reference sampler runs in fp32 on the host
        cfg = SampleConfig.for_bundle(bundle, fallback=config.sampling, seed=config.seed,
                                      batch_size=len(config.prompts))
        row["sampling"] = {"scheduler": cfg.scheduler, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
                           "seed": cfg.seed}
        row["images"] = _png_b64(generate(bundle, list(config.prompts), cfg, progress=False))


def _export_row(rows: list[dict[str, Any]], data: dict[str, Any]) -> dict[str, Any] | None:
    """The row an export was made from: same weights hash, else the same model folder."""
    return next((r for r in rows if data.get("model_hash") and r.get("content_hash") == data["model_hash"]), None) \
        or next((r for r in rows if r["spec"] and Path(r["spec"]).exists() and Path(data["model"]).exists()
                 and _same(data["model"], Path(r["spec"]))), None)


@dataclass
class _Figures:
    """What the attachers share: the rows, the run folder, the exports tied so far and the figures tied to none."""

    rows: list[dict[str, Any]]
    run_dir: Path
    exports: dict[Path, dict[str, Any]] = field(default_factory=dict)
    loose: list[str] = field(default_factory=list)

    def export_owner(self, folder: str) -> dict[str, Any] | None:
        """The row whose export lies in `folder`."""
        return next((row for f, row in self.exports.items() if _same(folder, f)), None)


def _attach_export(ctx: _Figures, path: Path, data: dict[str, Any]) -> bool:
    row = _export_row(ctx.rows, data)
    if row is not None:
        folder = path.parent
        ctx.exports[folder] = row
        row.setdefault("exports", []).append({
            "folder": str(folder), "quantization": (data.get("quantization") or {}).get("scheme"),
            "artifacts": [{"target": a["target"], "component": a["component"], "precision": a["precision"],
                           "bytes": _disk_bytes(folder / a["path"])} for a in data["artifacts"]]})
    return row is not None


def _attach_validation(ctx: _Figures, path: Path, data: dict[str, Any]) -> bool:
    row = ctx.export_owner(data["folder"])
    for t in data["targets"] if row is not None else []:
        worst = max((c.get("rel_l2") or 0.0 for c in t.get("components", {}).values()), default=None)
        row.setdefault("parity", {})[t["target"]] = {"status": t["status"], "psnr_db": t.get("psnr_db"),
                                                     "gate_db": t.get("gate_db"), "worst_rel_l2": worst}
    return row is not None


def _attach_profile(ctx: _Figures, path: Path, data: dict[str, Any]) -> bool:
    tied = False
    for prof in data["profiles"].values():  # A, and B with --against: each tied by its own export folder
        row = ctx.export_owner(prof["folder"])
        if row is None:
            continue
        tied = True
        for target, t in prof["targets"].items():
            image = t.get("image")
            row.setdefault("latency", {})[target] = {
                "status": t.get("status"), "image_ms": image and image["median_ms"],
                "image_p90_ms": image and image["p90_ms"], "steps": image and image["sampler"]["steps"],
                "peak_rss_mb": t.get("memory", {}).get("peak_rss_mb"),
                "components_ms": {c: v["median_ms"] for c, v in t.get("components", {}).items()}}
        if prof.get("estimates"):
            row["estimates"] = prof["estimates"]
    return tied


def _attach_quality(ctx: _Figures, path: Path, data: dict[str, Any]) -> bool:
    for cell in data["cells"]:  # student_quality names a cell "teacher ..." or "<run>/<stage> ..."
        row = next((r for r in ctx.rows if cell["name"].startswith(
            "teacher" if r["id"] == "teacher" else f"{ctx.run_dir.name}/{r['id']} ")), None)
        if row is None:
            ctx.loose.append(f"{path}: {cell['name']}")
        else:
            row.setdefault("quality", []).append(_quality(cell, str(path)))
    return True  # cells tied to no row are listed one by one above


def _attach_eval(ctx: _Figures, path: Path, data: dict[str, Any]) -> bool:
    row = next((r for r in ctx.rows if r["id"] != "teacher" and (ctx.run_dir / r["id"]) in path.parents), None)
    if row is not None:
        row.setdefault("quality", []).append(_quality(data, str(path)))
    return row is not None


Attach = Callable[[_Figures, Path, dict[str, Any]], bool]
# Each kind of figure: how it is told from its parsed JSON, and how it is put on its row (False: it fits none).
# The first test that matches wins; exports come first, as validations and profiles are tied through them.
FIGURE_KINDS: dict[str, tuple[Callable[[Path, dict[str, Any]], bool], Attach]] = {
    "export": (lambda p, d: p.name == "artifacts.json" and isinstance(d.get("artifacts"), list), _attach_export),
    "validation": (lambda p, d: isinstance(d.get("targets"), list) and "passed" in d and "folder" in d,
                   _attach_validation),
    "profile": (lambda p, d: isinstance(d.get("profiles"), dict) and "method" in d, _attach_profile),
    "quality": (lambda p, d: isinstance(d.get("cells"), list), _attach_quality),
    "eval": (lambda p, d: "fid" in d and "steps" in d, _attach_eval),
}


def find_figures(places: list[Path]) -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    """Every recognised figure file under `places` (files or folders), by kind; unreadable JSON is skipped."""
    found: dict[str, list[tuple[Path, dict[str, Any]]]] = {k: [] for k in FIGURE_KINDS}
    files = [p for place in places for p in ([place] if place.is_file() else sorted(place.rglob("*.json")))]
    for path in files:
        if path.name in _NOT_FIGURES or path.name.endswith("_config.json") or ".work" in path.parts:
            continue
        try:
            data = read_json(path)
        except (InputPathError, ValueError):
            continue
        kind = isinstance(data, dict) and next((k for k, (test, _) in FIGURE_KINDS.items() if test(path, data)), None)
        if kind:
            found[kind].append((path.resolve(), data))
    return found


def attach_figures(rows: list[dict[str, Any]], run_dir: Path,
                   found: dict[str, list[tuple[Path, dict[str, Any]]]]) -> list[str]:
    """Put every figure on its row (in place); returns the figures tied to no row."""
    ctx = _Figures(rows, run_dir)
    for kind, (_, attach) in FIGURE_KINDS.items():
        ctx.loose += [str(path) for path, data in found[kind] if not attach(ctx, path, data)]
    return ctx.loose


def _quality(cell: dict[str, Any], source: str) -> dict[str, Any]:
    keys = ("fid", "kid", "prompt_accuracy", "samples", "scheduler", "steps", "guidance_scale")
    return {**{k: cell.get(k) for k in keys}, "source": source}


def quality_latency_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(latency per image, quality) pairs measured at the same step count, per model, runtime and cell."""
    points = []
    for row in rows:
        for target, lat in row.get("latency", {}).items():
            for q in row.get("quality", []):
                if lat.get("image_ms") is not None and lat.get("steps") == q["steps"]:
                    points.append({"model": row["id"], "runtime": target, "steps": q["steps"],
                                   "image_ms": lat["image_ms"], "fid": q["fid"],
                                   "prompt_accuracy": q["prompt_accuracy"]})
    return points


def build_report(run_dir: Path, config: ReportConfig | None = None) -> dict[str, Any]:
    """The report of `run_dir` as a JSON-ready dict (what report.json holds and the HTML shows)."""
    from datetime import datetime, timezone

    config, run_dir = config or ReportConfig(), Path(run_dir).resolve()
    run = read_run(run_dir)
    for place in config.figures:
        if not Path(place).exists():
            raise InputPathError(f"--figures {place}: no such file or folder")
    rows = _model_rows(run_dir, run)
    for row in rows:
        if row["spec"]:
            _measure(row, config)
    found = find_figures([run_dir, *[Path(p) for p in config.figures]])
    loose = attach_figures(rows, run_dir, found)
    return {"run_dir": str(run_dir), "recipe": run.get("recipe"), "model": run.get("model"),
            "finished": run.get("finished"), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "prompts": list(config.prompts) if config.images else [], "rows": rows,
            "points": quality_latency_points(rows), "unattributed": loose,
            "searched": [str(run_dir)] + [str(p) for p in config.figures]}


def write_report(run_dir: Path, out: Path | None = None, config: ReportConfig | None = None) -> dict[str, Any]:
    """Build the report and write OUT (default RUN_DIR/report.html) and OUT with .json, each atomically, only
    once both are rendered; returns the report with the two paths."""
    from .fileio import prepare_output_file
    from .report_html import render

    read_run(run_dir)  # bad input fails before any work
    html_path = prepare_output_file(out or Path(run_dir) / REPORT_FILE, "--out")
    json_path = prepare_output_file(html_path.with_suffix(".json"), "--out")
    report = build_report(run_dir, config)
    html, data = render(report).encode(), (json_text(report, sort_keys=True) + "\n").encode()
    atomic_write_bytes(json_path, data)
    atomic_write_bytes(html_path, html)
    return {**report, "html": str(html_path), "json": str(json_path)}

"""The run report as one self-contained HTML page: a pure view of `report.build_report`'s JSON.

Inline CSS, images as base64 PNG, plots as inline SVG drawn here; no script and no external reference,
so the page renders the same with no network. A figure that is null reads "not measured".
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

NOT_MEASURED = "not measured"
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.nm{color:#999;font-style:italic}
.grid td{text-align:center;font-size:12px}.grid img{width:96px;height:96px;image-rendering:pixelated}
.plots{display:flex;flex-wrap:wrap;gap:16px}.meta{color:#555}.est{color:#a05a00}
"""


def _fmt(value: Any, spec: str = ",") -> str:
    """`value` formatted, or the "not measured" mark for None."""
    return f'<span class="nm">{NOT_MEASURED}</span>' if value is None else escape(format(value, spec))


def _per_runtime(values: dict[str, Any], spec: str) -> str:
    return "<br>".join(f"{escape(k)}: {_fmt(v, spec)}" for k, v in values.items()) or _fmt(None)


def _table(headers: list[str], rows: list[list[str]], id_: str = "", cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    attrs = (f' id="{id_}"' if id_ else "") + (f' class="{cls}"' if cls else "")
    return f"<table{attrs}><tr>{head}</tr>{body}</table>"


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 1e6


def _gmacs(row: dict[str, Any], component: str) -> float | None:
    c = row.get("components", {}).get(component)
    return None if c is None else c["macs"] / 1e9


def _cell(quality: dict[str, Any]) -> str:
    """A quality figure's sampling and sample count, e.g. "dpmsolver++ x25, n=1000"."""
    return f"{quality['scheduler']} x{quality['steps']}, n={quality['samples']}"


def stage_table(rows: list[dict[str, Any]]) -> str:
    """One line per model: params, MACs per call, weights, latency per runtime, quality and parity."""
    lines = []
    for r in rows:
        quality = r.get("quality", [])
        lines.append([
            escape(r["label"]), escape(r["status"]), _fmt(r.get("params")),
            _fmt(_gmacs(r, "text_encoder"), ".3f"), _fmt(_gmacs(r, "unet"), ".3f"), _fmt(_gmacs(r, "vae_decoder"), ".3f"),
            _per_runtime({c: _mb(n) for c, n in r.get("weights_bytes", {}).items()}, ".1f"),
            _per_runtime({f"{t}, {v['steps']} steps" if v["steps"] else t: v["image_ms"]
                          for t, v in r.get("latency", {}).items()}, ".1f"),
            _per_runtime({_cell(q): q["fid"] for q in quality}, ".2f"),
            _per_runtime({_cell(q): q["prompt_accuracy"] for q in quality}, ".3f"),
            _per_runtime({t: f"{v['status']}, {v['psnr_db']:.1f} dB" if v["psnr_db"] is not None else v["status"]
                          for t, v in r.get("parity", {}).items()}, "")])
    return _table(["model", "status", "params", "text enc. GMACs/call", "U-Net GMACs/call", "decoder GMACs/call",
                   "weights on disk MB", "latency ms/image", "FID", "prompt accuracy", "parity vs PyTorch"], lines, "stages")


def image_grid(report: dict[str, Any]) -> str:
    """Teacher and every stage for the same prompts and seeds, one row each."""
    rows = [r for r in report["rows"] if r.get("images")]
    if not rows:
        return f'<p class="nm">images {NOT_MEASURED} (no model was sampled)</p>'
    lines = []
    for r in rows:
        s = r["sampling"]
        label = (f"{escape(r['label'])}<br><span class=\"meta\">{escape(s['scheduler'])} x{s['steps']}, "
                 f"g={s['guidance_scale']}, seed {s['seed']}+</span>")
        lines.append([label] + [f'<img alt="{escape(p)}" src="data:image/png;base64,{b}">'
                                for p, b in zip(report["prompts"], r["images"])])
    return _table(["model"] + report["prompts"], lines, "images", "grid")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi]."""
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [i * step for i in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def _span(values: list[float]) -> tuple[float, float]:
    """The axis range: the values plus a margin of a tenth of their spread (of a fifth of one value alone)."""
    lo, hi = min(values), max(values)
    margin = 0.1 * (hi - lo) if hi > lo else 0.2 * abs(lo) or 1.0
    return lo - margin, hi + margin


def scatter_svg(points: list[tuple[float, float, str, str]], title: str, x_label: str, y_label: str,
                missing: str) -> str:
    """An inline SVG scatter of (x, y, series, label) points, one colour per series; `missing` when empty."""
    w, h, left, bottom, pad = 440, 300, 60, 42, 16
    if not points:
        return (f'<svg width="{w}" height="70"><text x="10" y="20" font-weight="bold">{escape(title)}</text>'
                f'<text x="10" y="42" fill="#999">{escape(NOT_MEASURED)}: needs {escape(missing)}</text></svg>')
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks, y_ticks = _ticks(*_span(xs)), _ticks(*_span(ys))

    def sx(x: float) -> float:
        return left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (w - left - pad)

    def sy(y: float) -> float:
        return h - bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (h - bottom - 2 * pad)

    series = list(dict.fromkeys(p[2] for p in points))
    parts = [f'<svg width="{w}" height="{h + 18 * len(series)}" '
             f'font-size="11"><text x="{left}" y="12" font-weight="bold">{escape(title)}</text>',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - pad}" y2="{h - bottom}" stroke="#444"/>',
             f'<line x1="{left}" y1="{h - bottom}" x2="{left}" y2="{2 * pad}" stroke="#444"/>']
    parts += [f'<text x="{sx(t):.1f}" y="{h - bottom + 14}" text-anchor="middle">{t:g}</text>' for t in x_ticks]
    parts += [f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>' for t in y_ticks]
    parts += [f'<text x="{(left + w) / 2}" y="{h - 8}" text-anchor="middle">{escape(x_label)}</text>',
              f'<text transform="translate(12,{h / 2}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>']
    for x, y, s, label in points:
        colour = _COLOURS[series.index(s) % len(_COLOURS)]
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{colour}"/>'
                     f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 5:.1f}" fill="{colour}">{escape(label)}</text>')
    parts += [f'<rect x="{left}" y="{h + 18 * i}" width="10" height="10" fill="{_COLOURS[i % len(_COLOURS)]}"/>'
              f'<text x="{left + 14}" y="{h + 18 * i + 9}">{escape(s)}</text>' for i, s in enumerate(series)]
    return "".join(parts) + "</svg>"


def plots(report: dict[str, Any]) -> str:
    """Quality against latency per image (same step count), and FID against step count."""
    pts = report["points"]
    need = "latency per image and quality at one step count"
    steps = [(q["steps"], q["fid"], r["id"], f"{q['steps']}") for r in report["rows"] for q in r.get("quality", [])
             if q["fid"] is not None and q["steps"] is not None]
    return '<div class="plots">' + "".join([
        scatter_svg([(p["image_ms"], p["fid"], f"{p['model']} ({p['runtime']})", f"{p['steps']} st")
                     for p in pts if p["fid"] is not None], "FID vs latency", "ms per image", "FID", need),
        scatter_svg([(p["image_ms"], p["prompt_accuracy"], f"{p['model']} ({p['runtime']})", f"{p['steps']} st")
                     for p in pts if p["prompt_accuracy"] is not None], "prompt accuracy vs latency",
                    "ms per image", "prompt accuracy", need),
        scatter_svg(steps, "FID vs sampling steps", "steps", "FID", "a quality figure"),
    ]) + "</div>"


def estimates_table(rows: list[dict[str, Any]]) -> str:
    """Roofline phone estimates from the profiles, labelled as estimates, with their calibration error."""
    lines = [[escape(r["label"]), escape(e["name"]), _fmt(e["image_ms"], ".1f"),
              _fmt(e["calibration_error_pct"], ".1f"), _fmt(e["memory"]["needed_mb"], ".0f"),
              "fits" if e["memory"]["fits"] else "does not fit"]
             for r in rows for e in r.get("estimates", [])]
    if not lines:
        return f'<p class="nm">device estimates {NOT_MEASURED} (no `pocketdiff profile` JSON of an export)</p>'
    return ('<p class="est">Estimates from a roofline model calibrated on published figures, not measurements.</p>'
            + _table(["model", "device", "est. ms/image", "calibration error %", "memory MB", "memory"], lines,
                     "estimates"))


def exports_table(rows: list[dict[str, Any]]) -> str:
    """Every exported artifact with its size on disk."""
    lines = [[escape(r["label"]), escape(a["target"]), escape(a["component"]), escape(a["precision"]),
              escape(x["quantization"] or "none"), _fmt(_mb(a["bytes"]), ".2f")]
             for r in rows for x in r.get("exports", []) for a in x["artifacts"]]
    if not lines:
        return f'<p class="nm">exports {NOT_MEASURED} (no artifacts.json of a model of this run)</p>'
    return _table(["model", "runtime", "component", "precision", "quantization", "MB"], lines, "exports")


def render(report: dict[str, Any]) -> str:
    """The whole page."""
    loose = "".join(f"<li>{escape(p)}</li>" for p in report["unattributed"])
    head = (f"<h1>pocketdiff run report</h1><p class=\"meta\">run {escape(report['run_dir'])} · recipe "
            f"{escape(str(report['recipe']))} · model {escape(str(report['model']))} · "
            f"{'finished' if report['finished'] else 'unfinished'} · built {escape(report['date'])}</p>")
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>pocketdiff report</title>',
        f"<style>{_CSS}</style></head><body>", head,
        "<h2>Stages</h2>", stage_table(report["rows"]),
        '<p class="meta">MACs per call at the native resolution, batch 1; latency: median per image of '
        "`pocketdiff profile`; FID and prompt accuracy: Fashion-MNIST yardstick; parity: `pocketdiff validate`.</p>",
        "<h2>Images (same prompts and seeds)</h2>", image_grid(report),
        "<h2>Quality vs latency</h2>", plots(report),
        "<h2>Device estimates</h2>", estimates_table(report["rows"]),
        "<h2>Exported artifacts</h2>", exports_table(report["rows"]),
        f"<h2>Figures tied to no model</h2><ul>{loose}</ul>" if loose else "",
        "</body></html>\n"])

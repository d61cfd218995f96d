"""Validation harness: exported artifacts against the PyTorch reference, per component and end to end.

Every artifact is opened in its runtime first, so a missing or corrupt file fails in seconds, before
any reference image is generated. Per component: every shape the artifact was exported for, seeded
inputs through the PyTorch wrapper and through the artifact's runtime; max abs error, relative L2,
cosine, each gated by a relative-L2 bound per component and precision. End to end: the sampling loop
of `pocketdiff.sampler` run through the exported components (`ArtifactComponents`) for fixed prompts
and seeds, final images against the reference by PSNR. The gates are calibrated from the measured
spread of clean exports with a stated margin (docs/BENCHMARKS.md, "Loaders and gates"). A target
whose runtime cannot execute here (Core ML on Linux) is reported "static check only". The report
is plain JSON: a non-finite figure is written as null and listed under "non_finite".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..bundle import Bundle
from ..errors import ConfigError, GateError, InputPathError
from ..export.base import Artifact, ArtifactSet, confined_path, load_builtins
from ..export.components import example_inputs, uses_attention_mask, wrap
from ..metrics.agreement import parity, psnr
from ..sampler import SampleConfig, TorchComponents, generate
from .base import Session, open_session

# End-to-end PSNR and per-component relative-L2 gates; how they were calibrated (clean spread, margin,
# planted faults each must catch): docs/BENCHMARKS.md, "Loaders and gates".
GATES_DB = {"fp32": 90.0, "fp16": 35.0}
COMPONENT_GATES = {
    "fp32": {"text_encoder": 3e-5, "unet": 3e-5, "vae_decoder": 1.5e-5, "vae_encoder": 1.5e-5},
    "fp16": {"text_encoder": 5e-3, "unet": 1.5e-2, "vae_decoder": 6e-3, "vae_encoder": 3e-3},
}
# Quantized artifacts are gated by their scheme's figures, recorded with the spec in artifacts.json
# (`compress.quantize.spec.SCHEMES`; docs/BENCHMARKS.md, "Quantization").
# F(4x4,3x3) rounds more than direct or F(2x2,3x3) convolution: a graph with F4 layers gets wider gates
WINOGRAD_F4_FACTOR = {"fp32": 10, "fp16": 3}
LAYER_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
PASSED, FAILED, STATIC = "passed", "failed", "static check only"


@dataclass
class ValidateConfig:
    """The fixed prompts and seed every validation uses; sampler settings left None come from the
    model (a distilled student validates at its own scheduler, steps and guidance), else `FALLBACK`."""

    prompts: tuple[str, ...] = ("a photo of a sneaker", "a dress, product shot")
    seed: int = 0
    steps: int | None = None
    scheduler: str | None = None
    guidance_scale: float | None = None
    resolution: int | None = None


FALLBACK = {"steps": 8, "scheduler": "ddim", "guidance_scale": 4.0}


class ArtifactComponents:
    """`Components` computed by exported artifacts; components not exported fall back to PyTorch."""

    device = torch.device("cpu")

    def __init__(self, bundle: Bundle, sessions: dict[str, Session]):
        self.bundle, self.sessions = bundle, sessions
        self.torch = TorchComponents(bundle)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        if "text_encoder" not in self.sessions:
            return self.torch.encode(prompts)
        tok = self.bundle.tokenizer(prompts, padding="max_length", max_length=self.bundle.tokenizer.model_max_length,
                                    truncation=True, return_tensors="np")
        feeds = {"input_ids": tok["input_ids"].astype(np.int64)}
        if uses_attention_mask(self.bundle.text_encoder):
            feeds["attention_mask"] = tok["attention_mask"].astype(np.int64)
        return _tensor(self.sessions["text_encoder"].run(feeds)["last_hidden_state"])

    def predict(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if "unet" not in self.sessions:
            return self.torch.predict(latents, t, context)
        feeds = {"sample": latents.numpy(), "timestep": t.float().numpy().reshape(-1),
                 "encoder_hidden_states": context.numpy()}
        return _tensor(self.sessions["unet"].run(feeds)["out_sample"])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if "vae_decoder" not in self.sessions:
            return self.torch.decode(latents)
        z = (latents / self.bundle.vae.config.scaling_factor).numpy()
        return _tensor(self.sessions["vae_decoder"].run({"latent_sample": z})["sample"])


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


@dataclass
class TargetReport:
    """Validation of one target's artifacts."""

    target: str
    precision: str
    status: str
    gate_db: float
    psnr_db: float | None = None
    components: dict[str, Any] = field(default_factory=dict)
    failed_components: list[str] = field(default_factory=list)
    first_diverging_layer: dict[str, Any] | None = None
    note: str = ""
    quantization: str | None = None  # the scheme, for quantized artifacts


def check_files(folder: Path, aset: ArtifactSet) -> None:
    """InputPathError naming the first artifact whose file is missing (paths are confined to `folder`)."""
    for a in aset.artifacts:
        if not confined_path(folder, a.path, f"{folder}: the {a.target} {a.component} artifact").exists():
            raise InputPathError(f"{folder}: the {a.target} {a.component} artifact ({a.path}) is missing; "
                                 "re-export the folder with `pocketdiff export`")


@torch.no_grad()
def component_parity(bundle: Bundle, artifact: Artifact, session: Session) -> list[dict[str, Any]]:
    """Parity of one artifact against its PyTorch wrapper at every exported shape."""
    spec = wrap(bundle, artifact.component)
    rows = []
    for shape in artifact.shapes or [{}]:
        first = next(iter(shape.values()), [1])
        batch = first[0]
        res = _resolution_of(bundle, artifact.component, shape)
        feeds = example_inputs(bundle, artifact.component, batch, res, seed=1)
        ref = spec.module(**feeds).float()
        out = session.run({k: v.numpy() for k, v in feeds.items()})[spec.output_names[0]]
        got = _tensor(out)
        span = float(ref.max() - ref.min()) or 1.0
        rows.append({"shape": {k: list(v.shape) for k, v in feeds.items()}, **parity(ref, got),
                     "psnr_db": psnr(ref, got, data_range=span)})
    return rows


def _resolution_of(bundle: Bundle, component: str, shape: dict[str, list[int]]) -> int | None:
    if component in ("unet", "vae_decoder"):
        key = "sample" if component == "unet" else "latent_sample"
        return shape[key][2] * bundle.vae_scale_factor if key in shape else None
    if component == "vae_encoder" and "sample" in shape:
        return shape["sample"][2]
    return None


def validate(folder: Path, bundle: Bundle | None = None, targets: list[str] | None = None,
             config: ValidateConfig | None = None, progress: bool = False) -> dict[str, Any]:
    """Validate every target in an artifact folder; returns the report (see `raise_on_failure`)."""
    from ..sources import load_model

    folder, config = Path(folder), config or ValidateConfig()
    aset = ArtifactSet.load(folder)
    check_files(folder, aset)
    load_builtins()
    have = sorted({a.target for a in aset.artifacts})
    targets = targets or have
    unknown = [t for t in targets if t not in have]
    if unknown:
        raise ConfigError(f"{folder} has no {unknown[0]} artifacts (has: {', '.join(have)})")
    sessions = {t: {a.component: open_session(a, folder) for a in aset.artifacts if a.target == t} for t in targets}
    bundle = bundle or load_model(aset.model)
    now = bundle.manifest.content_hash
    if aset.model_hash and now and now != aset.model_hash:
        raise ConfigError(f"the reference model {aset.model!r} is not the one {folder} was exported from (weights "
                          f"hash {now[:12]}, exported from {aset.model_hash[:12]}); pass the exported weights "
                          "with --model, or re-export")
    sample_cfg = SampleConfig.for_bundle(bundle, fallback=FALLBACK, steps=config.steps, scheduler=config.scheduler,
                                         guidance_scale=config.guidance_scale, seed=config.seed,
                                         height=config.resolution, width=config.resolution, batch_size=1)
    reference = generate(bundle, list(config.prompts), sample_cfg, TorchComponents(bundle), progress=progress)
    reports = [_validate_target(folder, aset, bundle, t, sessions[t], sample_cfg, reference, config, progress)
               for t in targets]
    report = {"folder": str(folder), "model": aset.model, "prompts": list(config.prompts), "seed": config.seed,
              "steps": sample_cfg.steps, "scheduler": sample_cfg.scheduler, "guidance_scale": sample_cfg.guidance_scale,
              "targets": [asdict(r) for r in reports],
              "passed": all(r.status == PASSED for r in reports),
              "failed": [r.target for r in reports if r.status == FAILED]}
    report["non_finite"] = []
    _non_finite(report, "", report["non_finite"])
    return report


def _non_finite(value: Any, where: str, found: list[str]) -> None:
    """Note in `found` every NaN / infinity in the report and why: JSON writers (`fileio.json_text`) write
    them as null, so the report says what each null stands for."""
    if isinstance(value, float) and not math.isfinite(value):
        why = "NaN: the output held non-finite values" if math.isnan(value) else f"{value}: the outputs were identical"
        found.append(f"{where.lstrip('.')} = {why}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _non_finite(v, f"{where}.{k}", found)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _non_finite(v, f"{where}[{i}]", found)


def component_gate(artifact: Artifact, precision: str, quantized: dict[str, Any] | None = None) -> float:
    """The relative-L2 gate of one artifact: its quantization scheme's (`quantized`: the spec's gates) for a
    quantized artifact, else its component's, widened for graphs with F(4x4,3x3) layers."""
    if quantized and "quantization" in artifact.details:
        return float(quantized["rel_l2"][artifact.component])
    winograd = artifact.details.get("winograd")
    tiles = winograd.get("rewritten") if isinstance(winograd, dict) else None
    tiles = tiles if isinstance(tiles, dict) else {}
    f4 = any(isinstance(m, int) and m >= 4 for m in tiles.values())
    return COMPONENT_GATES[precision][artifact.component] * (WINOGRAD_F4_FACTOR[precision] if f4 else 1)


def _passes(value: float, bound: float, above: bool = False) -> bool:
    """Whether a figure meets its gate; NaN never does."""
    return value >= bound if above else value <= bound


def _validate_target(folder: Path, aset: ArtifactSet, bundle: Bundle, target: str, sessions: dict[str, Session],
                     sample_cfg: SampleConfig, reference: torch.Tensor, config: ValidateConfig,
                     progress: bool) -> TargetReport:
    arts = {a.component: a for a in aset.artifacts if a.target == target}
    precision = "fp16" if any(a.precision == "fp16" for a in arts.values()) else "fp32"
    quantized = (aset.quantization or {}).get("gates")
    report = TargetReport(target=target, precision=precision, status=PASSED,
                          gate_db=quantized["psnr_db"] if quantized else GATES_DB[precision],
                          quantization=aset.quantization["scheme"] if aset.quantization else None)
    static = [c for c, s in sessions.items() if s.static_only]
    for comp, art in arts.items():
        if comp in static:
            report.components[comp] = {"status": STATIC, "checks": getattr(sessions[comp], "checks", {})}
            continue
        rows = component_parity(bundle, art, sessions[comp])
        worst = max((r["rel_l2"] for r in rows), key=lambda v: math.inf if math.isnan(v) else v)
        gate = component_gate(art, precision, quantized)
        ok = _passes(worst, gate)
        report.components[comp] = {"parity": rows, "rel_l2": worst, "gate_rel_l2": gate,
                                   "status": PASSED if ok else FAILED}
        if not ok:
            report.failed_components.append(comp)
    if static:
        report.status = STATIC
        report.note = f"{', '.join(static)} cannot run on this host; loaded and checked statically only"
        return report
    runnable = {c: s for c, s in sessions.items() if c != "vae_encoder"}
    images = generate(bundle, list(config.prompts), sample_cfg, ArtifactComponents(bundle, runnable), progress=progress)
    report.psnr_db = psnr(reference, images)
    if _passes(report.psnr_db, report.gate_db, above=True) and not report.failed_components:
        return report
    report.status = FAILED
    if not report.failed_components:  # every component within its gate, yet the images are not: isolate
        for comp, sess in runnable.items():
            alone = generate(bundle, list(config.prompts), sample_cfg, ArtifactComponents(bundle, {comp: sess}),
                             progress=False)
            report.components[comp]["psnr_alone_db"] = value = psnr(reference, alone)
            if not _passes(value, report.gate_db, above=True):
                report.failed_components.append(comp)
    if not report.failed_components:
        report.failed_components.append(max(runnable, key=lambda c: report.components[c]["rel_l2"]))
    if target == "onnx":
        from .onnx import first_diverging_layer

        comp = report.failed_components[0]
        spec = wrap(bundle, comp)
        feeds = example_inputs(bundle, comp, 1, config.resolution, seed=1)
        report.first_diverging_layer = first_diverging_layer(arts[comp], folder, spec.module, feeds,
                                                             quantized["layer_rel_l2"] if quantized
                                                             else LAYER_TOLERANCE[precision])
    return report


def failure_message(report: dict[str, Any]) -> str:
    """One line per failed target: each failing component's relative L2 against its gate, the end-to-end
    PSNR against its gate, and the first diverging layer."""
    lines = []
    for t in report["targets"]:
        if t["status"] != FAILED:
            continue
        parts = []
        for comp in t["failed_components"]:
            c = t["components"].get(comp, {})
            if c.get("status") == FAILED:
                parts.append(f"{comp} ({_figure('rel L2', c['rel_l2'])}, gate {c['gate_rel_l2']:.3g})")
            else:
                parts.append(f"{comp} (end to end)")
        layer = t.get("first_diverging_layer")
        where = f"; first diverging layer {layer['layer']} ({layer['op']}, {_figure('rel L2', layer['rel_l2'])})" \
            if layer else ""
        psnr_text = "n/a" if t["psnr_db"] is None else _figure("", t["psnr_db"], ".2f") + " dB"
        label = f"{t['precision']} quantized {t['quantization']}" if t.get("quantization") else t["precision"]
        lines.append(f"{t['target']} {label}: failing component(s): {', '.join(parts)}; end-to-end PSNR "
                     f"{psnr_text.strip()} (gate {t['gate_db']} dB){where}")
    return " | ".join(lines)


def _figure(name: str, value: float | None, spec: str = ".3g") -> str:
    """'rel L2 7.5e-04', or 'non-finite output' for NaN / None."""
    if value is None or math.isnan(value):
        return "non-finite output"
    return f"{name} {value:{spec}}"


def raise_on_failure(report: dict[str, Any]) -> None:
    """GateError when any target failed its gate."""
    if report["failed"]:
        raise GateError(failure_message(report))

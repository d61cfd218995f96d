"""Device estimates: a phone's per-image latency and memory fit from a roofline model, never a measurement.

Each component call costs max(MACs / compute peak, bytes / memory bandwidth) on a device of
`devices.json`, divided by an efficiency factor per accelerator kind (NPU, GPU): measured pipelines
reach a fraction of the vendor peak (shared/ANCHORS.md: about 20 %). The factor is fitted (geometric
mean of ideal / measured) on the published measurements listed in `devices.json`; the calibration
error is each point predicted with the factor fitted on the other points of its kind (leave-one-out;
a kind with one point has no held-out check, and says so). Roofline bytes are the weights read once
plus the call's inputs and outputs (a fused, tiled accelerator); the unfused count (every operator's
output written and read once, `Load.activation_elems`, which the profiler reports) predicts the
published figures far worse (docs/BENCHMARKS.md, "`pocketdiff profile` and device estimates"). The memory fit adds every component's weights to the
largest single operator's working set and compares with the RAM one app may hold.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..bundle import Bundle
from ..costs import measure_costs
from ..errors import ConfigError
from ..export.components import example_inputs, wrap

PROFILES = Path(__file__).with_name("devices.json")
IMAGE_COMPONENTS = ("text_encoder", "unet", "vae_decoder")


@dataclass(frozen=True)
class Device:
    """One accelerator: vendor peak (ops/s, 2 per MAC), DRAM bandwidth, RAM, and the sizes it runs at."""

    key: str
    name: str
    kind: str
    peak_tops: float
    bandwidth_gbs: float
    ram_gb: float
    app_share: float
    weight_bytes: int
    activation_bytes: int
    source: str


@dataclass(frozen=True)
class Load:
    """What one call of one component asks of a machine, counted on the real module (any device, meta too)."""

    macs: int
    params: int
    activation_elems: int  # every operator output, views excluded
    io_elems: int  # the call's inputs and outputs
    peak_op_elems: int  # the largest operator's activation inputs plus outputs

    def bytes_min(self, weight_bytes: int, activation_bytes: int) -> int:
        """Weights read once, inputs read and outputs written once: the traffic of a fully fused call."""
        return self.params * weight_bytes + self.io_elems * activation_bytes


class _ActivationCounter(TorchDispatchMode):
    """Counts the elements every operator writes, and the largest operator's activation working set."""

    def __init__(self) -> None:
        super().__init__()
        self.written, self.peak = 0, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and not t._is_view()]
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)]
        written = sum(t.numel() for t in outs)
        self.written += written
        self.peak = max(self.peak, written + sum(t.numel() for t in ins))
        return out


@torch.no_grad()
def component_loads(bundle: Bundle, batches: dict[str, int], resolution: int | None = None) -> dict[str, Load]:
    """The Load of one call of each component in `batches` (component -> batch) at `resolution` pixels."""
    loads = {}
    for component, batch in batches.items():
        cost = next(c for c in measure_costs(bundle, resolution, batch) if c.component == component)
        spec = wrap(bundle, component)
        device = next(spec.module.parameters()).device
        feeds = {k: v.to(device) for k, v in example_inputs(bundle, component, batch, resolution).items()}
        counter = _ActivationCounter()
        with counter:
            out = spec.module(**feeds)
        loads[component] = Load(macs=cost.macs, params=cost.params, activation_elems=counter.written,
                                io_elems=sum(v.numel() for v in feeds.values()) + out.numel(),
                                peak_op_elems=counter.peak)
    return loads


def roofline_ms(device: Device, load: Load, efficiency: float) -> float:
    """Milliseconds for one call: the slower of compute and memory traffic at `efficiency` of the peaks."""
    compute = load.macs * 2 / (device.peak_tops * 1e12)
    memory = load.bytes_min(device.weight_bytes, device.activation_bytes) / (device.bandwidth_gbs * 1e9)
    return 1000 * max(compute, memory) / efficiency


def image_ms(device: Device, loads: dict[str, Load], calls: dict[str, int], efficiency: float) -> float:
    """Milliseconds for one image: every component's calls (component -> number of calls)."""
    return sum(n * roofline_ms(device, loads[c], efficiency) for c, n in calls.items())


def memory_fit(device: Device, loads: dict[str, Load]) -> dict[str, Any]:
    """Whether every component's weights plus the largest operator's working set fit in one app's RAM."""
    weights = sum(load.params for load in loads.values()) * device.weight_bytes
    working = max(load.peak_op_elems for load in loads.values()) * device.activation_bytes
    budget = device.ram_gb * 1e9 * device.app_share
    return {"weights_mb": weights / 1e6, "working_set_mb": working / 1e6, "needed_mb": (weights + working) / 1e6,
            "budget_mb": budget / 1e6, "fits": weights + working <= budget}


@lru_cache(maxsize=1)
def _profiles() -> dict[str, Any]:
    return json.loads(PROFILES.read_text())


def devices() -> dict[str, Device]:
    """Every device profile, by key."""
    return {k: Device(key=k, **v) for k, v in _profiles()["devices"].items()}


def get_devices(keys: list[str] | None) -> list[Device]:
    """The named profiles (all when None); ConfigError naming the valid keys for an unknown one."""
    known = devices()
    for key in keys or []:
        if key not in known:
            raise ConfigError(f"unknown device {key!r}; choose from {', '.join(known)}")
    return [known[k] for k in keys or known]


@lru_cache(maxsize=4)
def _reference_loads(model: str, resolution: int, batches: tuple[tuple[str, int], ...]) -> dict[str, Load]:
    from ..sources import load_model

    return component_loads(load_model(model, shapes_only=True), dict(batches), resolution)


def calibration_points() -> list[dict[str, Any]]:
    """Each published measurement with its ideal (efficiency 1) roofline latency on its device."""
    known, points = devices(), []
    for p in _profiles()["calibration"]:
        device = known[p["device"]]
        loads = _reference_loads(p["model"], p["resolution"], tuple((c, b) for c, (_, b) in p["calls"].items()))
        ideal = image_ms(device, loads, {c: n for c, (n, _) in p["calls"].items()}, 1.0)
        points.append({**p, "ideal_ms": ideal, "efficiency": ideal / p["measured_ms"]})
    return points


def _fit(points: list[dict[str, Any]]) -> float:
    """The efficiency factor that best predicts `points` in log space: the geometric mean of ideal / measured."""
    return math.exp(sum(math.log(p["efficiency"]) for p in points) / len(points))


def calibrate() -> dict[str, Any]:
    """Per accelerator kind, the efficiency factor fitted on its points, and each point predicted with the fit
    on the others of its kind (None where it is the kind's only point)."""
    points, kinds = calibration_points(), {d.key: d.kind for d in devices().values()}
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_kind.setdefault(kinds[p["device"]], []).append(p)
    out: dict[str, Any] = {"kinds": {}, "points": [],
                           "method": "one efficiency factor per accelerator kind, the geometric mean of ideal/measured "
                                     "over its points; errors leave-one-out within the kind"}
    for kind, group in by_kind.items():
        errors = []
        for p in group:
            others = [q for q in group if q is not p]
            held_out = _fit(others) if others else None
            predicted = p["ideal_ms"] / held_out if held_out else None
            error = 100 * (predicted - p["measured_ms"]) / p["measured_ms"] if predicted else None
            if error is not None:
                errors.append(abs(error))
            out["points"].append({"id": p["id"], "device": p["device"], "kind": kind, "model": p["model"],
                                  "measured_ms": p["measured_ms"], "ideal_ms": p["ideal_ms"],
                                  "predicted_ms": predicted, "error_pct": error,
                                  "fitted_ms": p["ideal_ms"] / _fit(group), "efficiency_alone": p["efficiency"],
                                  "source": p["source"]})
        out["kinds"][kind] = {"efficiency": _fit(group), "points": len(group),
                              "max_abs_error_pct": max(errors) if errors else None}
    return out


def estimate(loads: dict[str, Load], calls: dict[str, int], targets: list[Device],
             calibration: dict[str, Any]) -> list[dict[str, Any]]:
    """Per device: estimated ms per component call and per image, and the memory fit (all labelled estimates)."""
    rows = []
    for d in targets:
        kind = calibration["kinds"][d.kind]
        eff = kind["efficiency"]
        rows.append({"device": d.key, "name": d.name, "kind": d.kind, "estimate": True, "efficiency": eff,
                     "calibration_error_pct": kind["max_abs_error_pct"], "calibration_points": kind["points"],
                     "components_ms": {c: roofline_ms(d, loads[c], eff) for c in calls},
                     "image_ms": image_ms(d, loads, calls, eff), "memory": memory_fit(d, loads)})
    return rows

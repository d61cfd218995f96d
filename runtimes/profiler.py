"""Side-by-side latency: time several runners of the same work fairly on one noisy machine; and
`profile_folder`, the figures of `pocketdiff profile` built on it.

Calls are made in alternating blocks. Each block starts with one untimed call, so that the runner
that ran before (whose thread pool may still be spinning, onnxruntime's default) has gone quiet and
this runner's caches are warm; the block's remaining calls are timed. The runner order rotates from
block to block, so no runner always follows the same one. Interleaving single calls instead lets one
runtime's spinning threads steal the cores from the next call: measured here on one conv layer, that
moved a direct-vs-Winograd ratio from 1.35-1.47x (blocks) to 3.1-3.7x (single calls).

`profile_folder` measures each runtime in child processes (`runtimes.profile_worker`): per component
call and per image, median and p90 of the rotating blocks; peak resident memory per folder and
runtime; per-operator time (`runtimes.operators`); MACs and bytes moved per call on the PyTorch
modules (`runtimes.estimates.component_loads`), and the MAC/s each call achieves against a dense
fp32 matmul timed in the same blocks (the host's peak). Phone figures are roofline estimates
(`runtimes.estimates`), labelled as such.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LatencyStats:
    """Timed calls of one runner, in seconds."""

    name: str
    times_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        """Fastest call."""
        return min(self.times_s)

    @property
    def p90_s(self) -> float:
        """90th percentile (nearest rank): the call time 9 in 10 calls stay within."""
        ranked = sorted(self.times_s)
        return ranked[max(0, math.ceil(0.9 * len(ranked)) - 1)]

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready summary."""
        return {"median_s": self.median_s, "p90_s": self.p90_s, "min_s": self.min_s, "max_s": max(self.times_s),
                "calls": len(self.times_s)}


def compare_latency(runners: dict[str, Callable[[], object]], blocks: int = 5, per_block: int = 3,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, LatencyStats]:
    """Time every runner in `blocks` rotating blocks of one untimed and `per_block` timed calls."""
    if not runners or blocks < 1 or per_block < 1:
        raise ValueError("compare_latency needs at least one runner, one block and one timed call per block")
    names = list(runners)
    stats = {n: LatencyStats(n) for n in names}
    for block in range(blocks):
        for name in names[block % len(names):] + names[: block % len(names)]:
            run = runners[name]
            run()
            for _ in range(per_block):
                start = clock()
                run()
                stats[name].times_s.append(clock() - start)
    return stats


def speedup(stats: dict[str, LatencyStats], baseline: str, candidate: str) -> float:
    """How many times faster `candidate` is than `baseline`, by median call time."""
    return stats[baseline].median_s / stats[candidate].median_s


# --- `pocketdiff profile`: an artifact folder's latency, memory, operators and costs -------------------------

PROMPT = "a photo of a sneaker"
_ACTIVATION_BYTES = {"fp32": 4, "fp16": 2}


@dataclass
class ProfileConfig:
    """How `profile_folder` measures: rotating blocks per runner, targets to profile, devices to estimate."""

    blocks: int = 4
    per_block: int = 2
    targets: list[str] | None = None  # default: every target in the folder
    devices: list[str] | None = None  # default: every profile in runtimes/devices.json


def _folder(folder: Path, targets: list[str] | None) -> tuple[Any, dict[str, list[str]]]:
    """The folder's ArtifactSet and its components per profiled target; user errors for a folder that is not
    an export, a missing file, or a target it lacks."""
    from ..errors import ConfigError
    from ..export.base import ArtifactSet
    from .harness import check_files

    aset = ArtifactSet.load(folder)
    check_files(folder, aset)
    have: dict[str, list[str]] = {}
    for a in aset.artifacts:
        have.setdefault(a.target, []).append(a.component)
    unknown = [t for t in targets or [] if t not in have]
    if unknown:
        raise ConfigError(f"{folder} has no {unknown[0]} artifacts (has: {', '.join(sorted(have))})")
    return aset, {t: sorted(have[t]) for t in targets or sorted(have)}


def _plan(label: str, folder: Path, aset: Any, components: list[str], work: Path) -> tuple[dict[str, Any], Any]:
    """What the worker needs for one folder (feeds in an .npz, the sampler settings), and its Bundle."""
    import numpy as np

    from ..export.components import example_inputs, uses_attention_mask
    from ..guidance import takes_guidance
    from ..sampler import SampleConfig, latent_shape
    from ..sources import load_model
    from .harness import FALLBACK

    bundle = load_model(aset.model)
    cfg = SampleConfig.for_bundle(bundle, fallback=FALLBACK, batch_size=1)
    guided = cfg.guidance_scale > 1.0 and not takes_guidance(bundle.unet)
    batches = {c: 2 if c == "unet" and guided else 1 for c in components}
    arrays = {f"{c}/{k}": v.numpy() for c in components for k, v in example_inputs(bundle, c, batches[c]).items()}
    image = None
    if all(c in components for c in ("text_encoder", "unet", "vae_decoder")):
        for key, prompt in (("cond", PROMPT), ("uncond", cfg.negative_prompt)):
            tok = bundle.tokenizer([prompt], padding="max_length", max_length=bundle.tokenizer.model_max_length,
                                   truncation=True, return_tensors="np")
            arrays[f"{key}/input_ids"] = tok["input_ids"].astype(np.int64)
            if uses_attention_mask(bundle.text_encoder):
                arrays[f"{key}/attention_mask"] = tok["attention_mask"].astype(np.int64)
        image = {"scheduler": cfg.scheduler, "scheduler_config": aset.sampler["scheduler"], "steps": cfg.steps,
                 "guidance_scale": cfg.guidance_scale, "guided": guided, "seed": cfg.seed,
                 "latent": [int(bundle.unet.config.in_channels), *latent_shape(bundle, None, None)],
                 "scaling_factor": aset.sampler["scaling_factor"],
                 "calls": {"text_encoder": 2 if guided else 1, "unet": cfg.steps, "vae_decoder": 1}}
    np.savez(work / f"{label}.npz", **arrays)
    return {"label": label, "folder": str(folder.resolve()), "feeds": str(work / f"{label}.npz"), "image": image,
            "batches": batches}, bundle


def _run_worker(job: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """Run one worker job in a fresh interpreter; its pocketdiff error is raised here with its own type."""
    import json
    import subprocess
    import sys

    from .. import errors

    job = {**job, "out": str(work / f"{name}.out.json")}
    path = work / f"{name}.json"
    path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "pocketdiff.runtimes.profile_worker", str(path)],
                          capture_output=True, text=True)
    out = Path(job["out"])
    if proc.returncode or not out.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise errors.RuntimeFailure(f"the {job['target']} profiling process failed (exit {proc.returncode}: {last})")
    result = json.loads(out.read_text())
    if "error" in result:
        kind = getattr(errors, result["error"]["kind"], errors.RuntimeFailure)
        raise kind(result["error"]["message"])
    return result


def _costs(loads: dict[str, Any], aset: Any, target: str) -> dict[str, dict[str, Any]]:
    """MACs and bytes moved per call of each component this target exports (vae_encoder: not counted)."""
    rows = {}
    for a in aset.artifacts:
        if a.target != target or a.component not in loads:
            continue
        load, act = loads[a.component], _ACTIVATION_BYTES[a.precision]
        weights = int(a.details.get("bytes") or load.params * act)
        rows[a.component] = {"macs": load.macs, "params": load.params, "weight_bytes": weights,
                             "bytes_min": weights + load.io_elems * act,
                             "bytes_unfused": weights + (load.io_elems + 2 * load.activation_elems) * act}
    return rows


def _assemble(plan: dict[str, Any], costs: dict[str, Any], memory: dict[str, Any], stats: dict[str, Any],
              peak_macs_s: float) -> dict[str, Any]:
    """One folder's figures on one target, from its worker results."""
    label, comps = plan["label"], {}
    for key, st in stats.items():
        owner, _, component = key.partition("/")
        if owner != label or component == "image":
            continue
        row = {"batch": plan["batches"][component], "median_ms": 1000 * st["median_s"], "p90_ms": 1000 * st["p90_s"],
               "timed_calls": st["calls"], **costs.get(component, {})}
        if "macs" in row:
            row["achieved_gmacs_per_s"] = row["macs"] / st["median_s"] / 1e9
            row["share_of_host_peak"] = row["macs"] / st["median_s"] / peak_macs_s
        comps[component] = row
    image = None
    if plan["image"]:
        st = stats[f"{label}/image"]
        median = 1000 * st["median_s"]
        calls = plan["image"]["calls"]
        image = {"median_ms": 1000 * st["median_s"], "p90_ms": 1000 * st["p90_s"], "timed_images": st["calls"],
                 "calls": calls, "sampler": {k: plan["image"][k] for k in ("scheduler", "steps", "guidance_scale")},
                 "share": {c: n * comps[c]["median_ms"] / median for c, n in calls.items()}}
    return {"status": "measured", "components": comps, "image": image, **memory}


def profile_folder(folder: Path, against: Path | None = None, config: ProfileConfig | None = None) -> dict[str, Any]:
    """Profile an artifact folder (and `against`, side by side): see `pocketdiff profile --help`."""
    import tempfile
    from datetime import datetime, timezone

    from ..errors import ConfigError
    from .estimates import IMAGE_COMPONENTS, calibrate, component_loads, estimate, get_devices

    config = config or ProfileConfig()
    folders = {"A": Path(folder)} | ({"B": Path(against)} if against else {})
    sets = {k: _folder(f, config.targets) for k, f in folders.items()}
    if against and sets["A"][1] != sets["B"][1]:
        raise ConfigError(f"--against {against} holds {_listing(sets['B'][1])} but {folder} holds "
                          f"{_listing(sets['A'][1])}; compare folders exported with the same --targets and --components")
    devices = get_devices(config.devices)
    calibration = calibrate()
    targets = sets["A"][1]
    result: dict[str, Any] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": _host(),
                              "method": {"blocks": config.blocks, "per_block": config.per_block,
                                         "warm_up": "one untimed call per runner, then one untimed call per block"},
                              "profiles": {}, "estimates": {"calibration": calibration}}
    with tempfile.TemporaryDirectory(prefix="pocketdiff-profile-") as tmp:
        work = Path(tmp)
        plans, loads = {}, {}
        comps = sorted({c for cs in targets.values() for c in cs})
        for label, f in folders.items():
            plans[label], bundle = _plan(label, f, sets[label][0], comps, work)
            loads[label] = component_loads(bundle, {c: b for c, b in plans[label]["batches"].items()
                                                    if c in IMAGE_COMPONENTS})
        job = {"blocks": config.blocks, "per_block": config.per_block}
        profiles = {label: {"folder": str(f), "model": sets[label][0].model, "targets": {}} for label, f in folders.items()}
        for target in targets:
            timing = _run_worker({**job, "mode": "latency", "target": target, "plans": list(plans.values())},
                                 work, f"latency-{target}")
            if timing["static_only"]:
                for p in profiles.values():
                    p["targets"][target] = {"status": "static check only: this host's runtime cannot run it"}
                continue
            m = timing["matmul"]
            rates = {k.removeprefix("matmul/"): m["macs"] / st["min_s"] for k, st in timing["stats"].items()
                     if k.startswith("matmul/")}
            peak = max(rates.values())
            result.setdefault("host_matmul_peak", {})[target] = {
                **m, "gmacs_per_s": peak / 1e9, "by_library_gmacs_per_s": {k: v / 1e9 for k, v in rates.items()},
                "rule": "fastest single call of the faster library, timed in the same blocks as the artifacts"}
            for label, plan in plans.items():
                memory = _run_worker({**job, "mode": "memory", "target": target, "plans": [plan]}, work,
                                     f"memory-{target}-{label}")
                memory.pop("static_only")
                costs = _costs(loads[label], sets[label][0], target)
                profiles[label]["targets"][target] = _assemble(plan, costs, memory, timing["stats"], peak)
    for label, plan in plans.items():
        if plan["image"]:
            profiles[label]["estimates"] = estimate(loads[label], plan["image"]["calls"], devices, calibration)
    result["profiles"] = profiles
    if against:
        result["against"] = against_ratios(profiles["A"], profiles["B"])
    return result


def against_ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per target, A's median time over B's, per component and per image (below 1: A is faster)."""
    ratios: dict[str, Any] = {"ratio": "median time of ARTIFACTS / median time of OTHER (below 1: ARTIFACTS is faster)",
                              "targets": {}}
    for target, ta in a["targets"].items():
        tb = b["targets"][target]
        if ta.get("status") != "measured":
            continue
        row = {c: ta["components"][c]["median_ms"] / tb["components"][c]["median_ms"] for c in ta["components"]}
        if ta["image"] and tb["image"]:
            row["image"] = ta["image"]["median_ms"] / tb["image"]["median_ms"]
        ratios["targets"][target] = row
    return ratios


def _listing(targets: dict[str, list[str]]) -> str:
    return "; ".join(f"{t}: {', '.join(cs)}" for t, cs in targets.items())


def _host() -> dict[str, Any]:
    """What machine measured: CPU model, cores, load average when the profile started."""
    import os
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() \
        else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": list(os.getloadavg()), "platform": platform.platform()}

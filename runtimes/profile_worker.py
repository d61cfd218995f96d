"""The child process of `pocketdiff profile`: one runtime's measurements, in an interpreter of their own.

`python -m pocketdiff.runtimes.profile_worker JOB.json` runs one job and writes its result beside
it. A "memory" job loads one folder's artifacts of one target, draws one image (or calls each
component once), reads the process's peak resident memory, then profiles each component's
operators. A "latency" job loads every folder's artifacts of one target and times each component
call, each image and a dense fp32 matrix multiply in the same rotating blocks
(`runtimes.profiler.compare_latency`). Each runtime runs in its own process so that one's memory
and thread pools never reach another's figures. The parent prepares every input (token ids,
sampler settings), so no PyTorch model is loaded here.
"""

from __future__ import annotations

import json
import resource
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PocketdiffError
from ..export.base import ArtifactSet, load_builtins
from .base import Session, open_session
from .profiler import compare_latency

MATMUL_SIDE = 1024  # a dense fp32 matmul of this side is the host's compute peak


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), in MB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SessionPipeline:
    """`sampler.Components` over loaded sessions, fed with the parent's token ids ("cond" / "uncond")."""

    device = torch.device("cpu")

    def __init__(self, sessions: dict[str, Session], text: dict[str, dict[str, np.ndarray]], scaling: float):
        self.sessions, self.text, self.scaling = sessions, text, scaling

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.sessions["text_encoder"].run(self.text[prompts[0]])["last_hidden_state"])

    def predict(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feeds = {"sample": latents.numpy(), "timestep": t.float().numpy().reshape(-1),
                 "encoder_hidden_states": context.numpy()}
        return torch.from_numpy(self.sessions["unet"].run(feeds)["out_sample"])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sessions["vae_decoder"].run({"latent_sample": (latents / self.scaling).numpy()})
                                ["sample"])


def image_runner(sessions: dict[str, Session], text: dict[str, dict[str, np.ndarray]],
                 image: dict[str, Any]) -> Callable[[], torch.Tensor]:
    """A zero-argument call drawing one image with the sampler settings `image` (the parent's plan)."""
    from ..sampler import image_generators, initial_latents, sample_latents
    from ..schedulers import make_scheduler

    pipeline = SessionPipeline(sessions, text, image["scaling_factor"])
    channels, h, w = image["latent"]

    def draw() -> torch.Tensor:
        scheduler = make_scheduler(image["scheduler"], image["scheduler_config"])
        context = pipeline.encode(["cond"])
        uncond = pipeline.encode(["uncond"]) if image["guided"] else None
        gens = image_generators(1, image["seed"])
        latents = initial_latents(1, channels, (h, w), image["seed"], 0, gens)
        latents = sample_latents(pipeline, scheduler, context, uncond, latents, image["steps"],
                                 image["guidance_scale"], gens)
        return (pipeline.decode(latents) / 2 + 0.5).clamp(0, 1)
    return draw


def _load(plan: dict[str, Any], target: str) -> tuple[dict[str, Session], dict[str, dict[str, np.ndarray]],
                                                      dict[str, dict[str, np.ndarray]]]:
    """(sessions by component, per-call feeds by component, token feeds) of one folder's plan."""
    folder = Path(plan["folder"])
    aset = ArtifactSet.load(folder)
    sessions = {a.component: open_session(a, folder) for a in aset.artifacts if a.target == target}
    arrays = np.load(plan["feeds"])
    feeds: dict[str, dict[str, np.ndarray]] = {}
    for key in arrays.files:
        group, name = key.split("/")
        feeds.setdefault(group, {})[name] = arrays[key]
    text = {k: feeds.pop(k) for k in ("cond", "uncond") if k in feeds}
    return sessions, feeds, text


def memory_job(job: dict[str, Any]) -> dict[str, Any]:
    """Peak resident memory of one folder's artifacts on one runtime, then their per-operator profiles."""
    from .operators import OPERATOR_PROFILERS

    (plan,) = job["plans"]
    target = job["target"]
    before = rss_mb()
    sessions, feeds, text = _load(plan, target)
    if any(s.static_only for s in sessions.values()):
        return {"static_only": True}
    loaded = rss_mb()
    if plan["image"]:
        image_runner(sessions, text, plan["image"])()
    for component, session in sessions.items():
        session.run(feeds[component])
    peak = rss_mb("VmHWM")
    operators: dict[str, Any] = {}
    profiler = OPERATOR_PROFILERS.get(target)
    for component, session in sessions.items():
        if profiler is None:
            operators[component] = {"error": f"no per-operator profiler for {target} artifacts"}
            continue
        try:
            operators[component] = profiler(session.artifact, Path(plan["folder"]), feeds[component])
        except Exception as e:  # a profiler the runtime build lacks is reported, not fatal to the latencies
            operators[component] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    return {"static_only": False, "memory": {"rss_after_imports_mb": before, "rss_after_load_mb": loaded,
                                             "peak_rss_mb": peak},
            "operators": operators}


def latency_job(job: dict[str, Any]) -> dict[str, Any]:
    """Every folder's component calls and images, and a dense matmul, timed side by side in rotating blocks."""
    target, runners = job["target"], {}
    for plan in job["plans"]:
        sessions, feeds, text = _load(plan, target)
        if any(s.static_only for s in sessions.values()):
            return {"static_only": True}
        for component, session in sessions.items():
            runners[f"{plan['label']}/{component}"] = (lambda s=session, f=feeds[component]: s.run(f))
        if plan["image"]:
            runners[f"{plan['label']}/image"] = image_runner(sessions, text, plan["image"])
    runners.update(matmul_runners())
    for run in runners.values():  # warm-up outside the timing: first-call allocations, lazy method loads
        run()
    stats = compare_latency(runners, blocks=job["blocks"], per_block=job["per_block"])
    return {"static_only": False, "stats": {name: st.as_dict() for name, st in stats.items()},
            "matmul": {"side": MATMUL_SIDE, "macs": MATMUL_SIDE ** 3, "torch_threads": torch.get_num_threads()}}


def matmul_runners() -> dict[str, Callable[[], object]]:
    """Dense fp32 square matmuls through torch (MKL / oneDNN) and through onnxruntime's MLAS, each with its
    library's default threads: the faster is the host's peak (MLAS measured about 2x torch here)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    side = MATMUL_SIDE
    a, b, c = torch.randn(side, side), torch.randn(side, side), torch.empty(side, side)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [side, side]) for n in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"A": a.numpy(), "B": b.numpy()}
    return {"matmul/torch": lambda: torch.mm(a, b, out=c), "matmul/onnxruntime": lambda: session.run(None, feeds)}


JOBS = {"memory": memory_job, "latency": latency_job}


def main(job_path: str) -> int:
    """Run the job in `job_path`; write its result (or the pocketdiff error it raised) to the job's "out"."""
    job = json.loads(Path(job_path).read_text())
    load_builtins()
    try:
        result = JOBS[job["mode"]](job)
    except PocketdiffError as e:
        result = {"error": {"kind": type(e).__name__, "message": str(e)}}
    except Exception as e:  # the parent reports it as a runtime failure, with the cause
        result = {"error": {"kind": "RuntimeFailure", "message": f"{type(e).__name__}: {str(e).strip()[:300]}",
                            "traceback": traceback.format_exc()[-2000:]}}
    Path(job["out"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

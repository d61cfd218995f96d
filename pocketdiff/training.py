"""A small resumable training loop shared by every trainer in pocketdiff.

Each step draws its randomness from a generator seeded by (seed, step), so a run interrupted and
resumed from its last checkpoint takes the same batches as one that never stopped. Checkpoints hold
only tensors and numbers and are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .fileio import atomic_write_bytes


@dataclass
class LoopSpec:
    """What one training phase is: its name, length, schedule and where it checkpoints."""

    name: str
    steps: int
    lr: float
    warmup: int
    ckpt_dir: Path
    checkpoint_every: int = 500
    time_limit_s: float | None = None
    grad_clip: float = 1.0


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for one step's randomness: independent of how the run was split."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA, a no-op on CPU: every trainer's mixed-precision context."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def lr_at(spec: LoopSpec, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save(path: Path, state: dict) -> None:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def run_loop(spec: LoopSpec, model: torch.nn.Module, loss_fn: Callable[[int], torch.Tensor],
             ema: EMAModel | None = None, progress: bool = True) -> bool:
    """Train `model` on `loss_fn(step)` until `spec.steps`; True when finished, False if stopped by the time limit."""
    ckpt = spec.ckpt_dir / f"{spec.name}.ckpt"
    log_path = spec.ckpt_dir / f"{spec.name}_log.jsonl"
    params = [p for p in model.parameters() if p.requires_grad]
    fused = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.999), weight_decay=0.0, fused=fused)
    start = 0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=next(model.parameters()).device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start = int(state["step"])
    if start >= spec.steps:
        return True
    spec.ckpt_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    model.train()
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps, desc=spec.name, disable=not progress)
    running = None
    with log_path.open("a") as log:
        for step in bar:
            lr = lr_at(spec, step)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = loss_fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            opt.step()
            if ema is not None:
                ema.step(params)
            value = loss.item() if step % 50 == 0 or step == spec.steps - 1 else None
            if value is not None:
                running = value if running is None else 0.9 * running + 0.1 * value
                bar.set_postfix(loss=f"{running:.4f}")
                log.write(json.dumps({"step": step, "loss": value, "lr": lr,
                                      "elapsed_s": round(time.monotonic() - t0, 2)}) + "\n")
            done = step + 1
            out_of_time = spec.time_limit_s is not None and time.monotonic() - t0 > spec.time_limit_s
            if done % spec.checkpoint_every == 0 or done == spec.steps or out_of_time:
                _save(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "step": done,
                             "ema": ema.state_dict() if ema is not None else {}})
            if out_of_time and done < spec.steps:
                bar.close()
                return False
    model.eval()
    return True

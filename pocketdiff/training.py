"""The one training loop every trainer in pocketdiff runs on.

A `Trainer` owns named modules, their optimizers (one per parameter group: a generator and its
critic step separately), EMA copies, bf16 autocast, checkpoints and the JSONL log. A method
supplies only `step_fn(step, ctx)`: it computes its losses and calls `ctx.update(name, loss)` for
each optimizer as often as it likes (several critic updates per generator update included).

Determinism: each step's randomness comes from a generator seeded by (seed, step), and a batch is
drawn whole (the *global* batch) before each process takes its shard, so a run resumed from its
checkpoint, or split over N processes (`pocketdiff.distributed`), takes the same batches as one
that never stopped. Checkpoints hold only tensors and numbers, are written atomically by the first
process, hold the unwrapped modules' state (no DDP `module.` prefix), and are read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .errors import CorruptFileError
from .fileio import atomic_write_bytes

CKPT_VERSION = 2


@dataclass
class OptimizerSpec:
    """One AdamW over the trainable parameters of `modules`, with warm-up then cosine decay."""

    name: str
    modules: list[str]
    lr: float
    warmup: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    final_lr_fraction: float = 0.1


@dataclass
class LoopSpec:
    """What one training phase is: its name, length, where it checkpoints and when it must stop."""

    name: str
    steps: int
    ckpt_dir: Path
    seed: int = 0
    checkpoint_every: int = 500
    time_limit_s: float | None = None
    deadline: float | None = None  # time.monotonic() value; the earlier of this and time_limit_s wins
    log_every: int = 50
    batch_size: int | None = None  # global samples per step, for the samples/s the log reports


def step_generator(seed: int, step: int, device: torch.device | str) -> torch.Generator:
    """The generator for one step's randomness: independent of how the run was split."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA, a no-op on CPU: every trainer's mixed-precision context."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def lr_at(spec: OptimizerSpec, steps: int, step: int) -> float:
    """Linear warm-up, then cosine decay to `final_lr_fraction` of the peak at `steps`."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, steps - spec.warmup)
    floor = spec.final_lr_fraction
    return spec.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class StepContext:
    """What `step_fn` gets each step: its generator, the modules to call, and `update`."""

    step: int
    generator: torch.Generator
    models: dict[str, nn.Module]  # DDP-wrapped where several processes train
    device: torch.device
    update: Callable[[str, torch.Tensor], None]
    metrics: dict[str, float] = field(default_factory=dict)

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's slice of a global batch (the whole batch in a single process)."""
        return distributed.shard(batch)


class Trainer:
    """Train named modules with named optimizers until `spec.steps`, resumably."""

    def __init__(self, spec: LoopSpec, modules: dict[str, nn.Module], optimizers: list[OptimizerSpec],
                 emas: dict[str, EMAModel] | None = None, progress: bool = True) -> None:
        self.spec, self.modules, self.emas, self.progress = spec, modules, emas or {}, progress
        self.device = next(p for m in modules.values() for p in m.parameters()).device
        fused = self.device.type == "cuda"
        self.optim_specs = {o.name: o for o in optimizers}
        self.params = {o.name: [p for n in o.modules for p in modules[n].parameters() if p.requires_grad]
                       for o in optimizers}
        self.optimizers = {o.name: torch.optim.AdamW(self.params[o.name], lr=o.lr, betas=o.betas,
                                                     weight_decay=o.weight_decay, fused=fused)
                           for o in optimizers}
        trained = {n for o in optimizers for n in o.modules}
        self.wrapped = {n: distributed.wrap(m) if n in trained else m for n, m in modules.items()}
        self.ckpt = spec.ckpt_dir / f"{spec.name}.ckpt"
        self.log_path = spec.ckpt_dir / f"{spec.name}_log.jsonl"
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, unwrapped (module names without DDP's prefix)."""
        return {"version": CKPT_VERSION, "name": self.spec.name, "step": self.step,
                "modules": {n: m.state_dict() for n, m in self.modules.items()},
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "emas": {n: e.state_dict() for n, e in self.emas.items()}}

    def load_checkpoint(self) -> None:
        """Resume from `spec.ckpt_dir` if a checkpoint of this phase is there; CorruptFileError if it is foreign."""
        if not self.ckpt.is_file():
            return
        try:
            state = torch.load(self.ckpt, map_location=self.device, weights_only=True)
        except Exception as e:  # noqa: BLE001  (any unreadable file: truncated, foreign, not a checkpoint)
            raise CorruptFileError(f"{self.ckpt}: unreadable checkpoint ({type(e).__name__}); delete it to "
                                   "start this stage again") from e
        expected = {"modules": set(self.modules), "optimizers": set(self.optimizers), "emas": set(self.emas)}
        if (not isinstance(state, dict) or state.get("version") != CKPT_VERSION or state.get("name") != self.spec.name
                or any(set(state.get(k, {})) != v for k, v in expected.items())):
            raise CorruptFileError(f"{self.ckpt}: not a checkpoint of training phase {self.spec.name!r} with "
                                   f"modules {sorted(self.modules)}; delete it to start this stage again")
        try:
            for n, m in self.modules.items():
                m.load_state_dict(state["modules"][n])
            for n, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][n])
            for n, e in self.emas.items():
                e.load_state_dict(state["emas"][n])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CorruptFileError(f"{self.ckpt}: does not match this model ({str(e).splitlines()[0][:200]}); "
                                   "delete it to start this stage again") from e
        self.step = int(state["step"])

    def _save(self) -> None:
        if distributed.is_main():
            buf = io.BytesIO()
            torch.save(self.state_dict(), buf)
            atomic_write_bytes(self.ckpt, buf.getvalue())
        distributed.barrier()

    def _update(self, name: str, loss: torch.Tensor) -> None:
        opt, spec = self.optimizers[name], self.optim_specs[name]
        for g in opt.param_groups:
            g["lr"] = lr_at(spec, self.spec.steps, self.step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params[name], spec.grad_clip)
        opt.step()
        if name in self.emas:
            self.emas[name].step(self.params[name])

    def _deadline(self) -> float | None:
        limits = [d for d in (self.spec.deadline, None if self.spec.time_limit_s is None
                              else time.monotonic() + self.spec.time_limit_s) if d is not None]
        return min(limits) if limits else None

    def one_step(self, step_fn: Callable[[StepContext], torch.Tensor | None]) -> StepContext:
        """One training step at `self.step` (no checkpoint, no log): what `fit` repeats, and what a
        throughput benchmark times."""
        ctx = StepContext(self.step, step_generator(self.spec.seed, self.step, self.device), self.wrapped,
                          self.device, self._update)
        loss = step_fn(ctx)
        if loss is not None:
            if len(self.optimizers) != 1:
                raise ValueError("step_fn returned a loss but the trainer has several optimizers")
            self._update(next(iter(self.optimizers)), loss)
            ctx.metrics.setdefault("loss", loss)
        self.step += 1
        return ctx

    def fit(self, step_fn: Callable[[StepContext], torch.Tensor | None]) -> bool:
        """Run `step_fn` from the checkpointed step to `spec.steps`; True when finished, False when the
        deadline stopped it (a checkpoint is written first, so the next call resumes).

        `step_fn` calls `ctx.update(name, loss)` itself; if it returns a loss instead and there is one
        optimizer, the loop updates with it. Scalars put in `ctx.metrics` are logged.
        """
        self.load_checkpoint()
        if self.step >= self.spec.steps:
            return True
        deadline = self._deadline()
        self.spec.ckpt_dir.mkdir(parents=True, exist_ok=True)
        for m in self.modules.values():
            m.train()
        t0 = time.monotonic()
        bar = tqdm(total=self.spec.steps, initial=self.step, desc=self.spec.name,
                   disable=not (self.progress and distributed.is_main()))
        running: float | None = None
        last_t, last_step = t0, self.step
        with _log_file(self.log_path) as log:
            while self.step < self.spec.steps:
                step = self.step
                ctx = self.one_step(step_fn)
                done = self.step
                if step % self.spec.log_every == 0 or done == self.spec.steps:
                    values = {k: float(v) for k, v in ctx.metrics.items()}
                    now = time.monotonic()
                    if self.spec.batch_size and done > last_step:
                        values["samples_per_s"] = round(self.spec.batch_size * (done - last_step) / (now - last_t), 1)
                    last_t, last_step = now, done
                    if "loss" in values:
                        running = values["loss"] if running is None else 0.9 * running + 0.1 * values["loss"]
                        bar.set_postfix(loss=f"{running:.4f}", **({"samples/s": values["samples_per_s"]}
                                                                  if "samples_per_s" in values else {}))
                    if log is not None:
                        log.write(json.dumps({"step": step, "lr": lr_at(next(iter(self.optim_specs.values())),
                                                                        self.spec.steps, step),
                                              **values, "elapsed_s": round(now - t0, 2)}) + "\n")
                        log.flush()
                bar.update(1)
                out_of_time = distributed.any_true(deadline is not None and time.monotonic() > deadline)
                if done % self.spec.checkpoint_every == 0 or done == self.spec.steps or out_of_time:
                    self._save()
                if out_of_time and done < self.spec.steps:
                    bar.close()
                    return False
        bar.close()
        for m in self.modules.values():
            m.eval()
        return True


@contextlib.contextmanager
def _log_file(path: Path) -> Iterator[Any]:
    """The JSONL log, appended to by the first process only (others get None)."""
    if not distributed.is_main():
        yield None
        return
    with path.open("a") as f:
        yield f


def run_loop(spec: LoopSpec, model: nn.Module, loss_fn: Callable[[int, torch.Generator], torch.Tensor], lr: float,
             warmup: int, ema: EMAModel | None = None, grad_clip: float = 1.0, progress: bool = True) -> bool:
    """The common case on the one loop: one module, one optimizer, `loss_fn(step, generator)` per step."""
    trainer = Trainer(spec, {"model": model}, [OptimizerSpec("model", ["model"], lr, warmup, grad_clip=grad_clip)],
                      emas={"model": ema} if ema is not None else None, progress=progress)
    return trainer.fit(lambda ctx: loss_fn(ctx.step, ctx.generator))

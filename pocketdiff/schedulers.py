"""The sampling schedulers users expect, by name, built from a pipeline's scheduler config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffusers

from .errors import ConfigError

_FACTORIES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "ddim": lambda cfg: diffusers.DDIMScheduler.from_config(cfg),
    "dpmsolver++": lambda cfg: diffusers.DPMSolverMultistepScheduler.from_config(
        cfg, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"),
    "euler": lambda cfg: diffusers.EulerDiscreteScheduler.from_config(cfg),
    "lcm": lambda cfg: diffusers.LCMScheduler.from_config(cfg),
}
MAX_STEPS = 1000


def scheduler_names() -> list[str]:
    """Scheduler names accepted everywhere a scheduler is chosen."""
    return list(_FACTORIES)


def make_scheduler(name: str, config: dict[str, Any]) -> Any:
    """A fresh diffusers scheduler `name` sharing the noise schedule of `config`."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(_FACTORIES)}") from None
    return factory(dict(config))


def step_limit(scheduler: Any) -> int:
    """The most sampling steps `scheduler` takes: its training timesteps, and for LCM at most the
    `original_inference_steps` its timesteps are drawn from."""
    cfg = scheduler.config
    limit = int(cfg.get("num_train_timesteps", MAX_STEPS))
    if cfg.get("original_inference_steps") is not None and isinstance(scheduler, diffusers.LCMScheduler):
        limit = min(limit, int(cfg["original_inference_steps"]))
    return limit


def check_steps(steps: int, scheduler: Any, name: str) -> None:
    """ConfigError unless 1 <= steps <= `step_limit(scheduler)`; `name` is the scheduler's name for the message."""
    limit = step_limit(scheduler)
    if not 1 <= steps <= limit:
        raise ConfigError(f"steps must be between 1 and {limit} for the {name} scheduler of this model, got {steps}")

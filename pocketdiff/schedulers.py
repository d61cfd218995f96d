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


def check_steps(steps: int, num_train_timesteps: int = MAX_STEPS) -> None:
    """Raise ConfigError unless 1 <= steps <= the training timesteps."""
    if not 1 <= steps <= num_train_timesteps:
        raise ConfigError(f"steps must be between 1 and {num_train_timesteps}, got {steps}")

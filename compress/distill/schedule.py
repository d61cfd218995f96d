"""Noise-schedule arithmetic every step-distillation method shares.

All of it follows the teacher's own DDPM schedule (`alphas_cumprod`) and prediction type, so a
student distils any epsilon- or v-prediction SD-family teacher. `DDIMSolver` is the skipping-step
DDIM ODE solver of latent consistency distillation (LCM): 50 timesteps over the 1,000 training
ones, the same grid diffusers' `LCMScheduler` samples on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ConfigError

PREDICTIONS = ("epsilon", "v_prediction")


@dataclass
class NoiseSchedule:
    """sqrt(alpha_bar) and sqrt(1 - alpha_bar) per training timestep, and the prediction type."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler: object, device: torch.device | str = "cpu") -> NoiseSchedule:
        """The schedule of a diffusers scheduler (DDIM, DDPM, LCM, ... share `alphas_cumprod`)."""
        config = scheduler.config
        kind = config.get("prediction_type", "epsilon")
        if kind not in PREDICTIONS:
            raise ConfigError(f"teacher prediction type {kind!r} is not one step distillation handles "
                              f"({', '.join(PREDICTIONS)})")
        bar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        return cls(bar.sqrt(), (1 - bar).sqrt(), kind)

    @property
    def steps(self) -> int:
        """Training timesteps (1,000 for SD)."""
        return len(self.alpha)

    def at(self, t: torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) shaped to broadcast over a batch of latents."""
        shape = (-1,) + (1,) * (ndim - 1)
        return self.alpha[t].view(shape), self.sigma[t].view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise."""
        a, s = self.at(t, x0.ndim)
        return a * x0 + s * noise

    def x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model output read as (predicted x0, predicted noise) for its prediction type."""
        a, s = self.at(t, x_t.ndim)
        if self.prediction_type == "epsilon":
            return (x_t - s * output) / a, output
        return a * x_t - s * output, s * x_t + a * output

    def output_from(self, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model output (of this prediction type) that means (x0, eps) at x_t."""
        if self.prediction_type == "epsilon":
            return eps
        a, s = self.at(t, x_t.ndim)
        return a * eps - s * x0

    def ddim_step(self, x0: torch.Tensor, eps: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM move to timestep t_prev."""
        a, s = self.at(t_prev, x0.ndim)
        return a * x0 + s * eps

    def truncated_snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """max(SNR_t, 1): the x-space weight of progressive distillation (Salimans & Ho)."""
        a, s = self.alpha[t], self.sigma[t]
        return torch.clamp(a ** 2 / s ** 2, min=1.0)


@dataclass
class DDIMSolver:
    """The skipping-step grid: timesteps c·k − 1 for k = 1..n with c = training steps // n."""

    timesteps: torch.Tensor  # ascending: [c - 1, 2c - 1, ..., T - 1]
    skip: int

    @classmethod
    def build(cls, train_steps: int, n: int, device: torch.device | str = "cpu") -> DDIMSolver:
        if not 1 <= n <= train_steps or train_steps % n:
            raise ConfigError(f"ddim_timesteps must divide the teacher's {train_steps} training steps, got {n}")
        skip = train_steps // n
        return cls(torch.arange(1, n + 1, device=device) * skip - 1, skip)


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's consistency-function scalings (c_skip, c_out): c_skip → 1, c_out → 0 as t → 0.
    diffusers' LCMScheduler applies the same ones at sampling time (`timestep_scaling`)."""
    scaled = timestep_scaling * t.float()
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    shape = (-1, 1, 1, 1)
    return c_skip.view(shape), c_out.view(shape)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample sqrt(|a − b|² + c²) − c, averaged over elements (LCM's loss; c → 0 is L1-like)."""
    diff = (a.float() - b.float()) ** 2
    return (torch.sqrt(diff + c ** 2) - c).mean(dim=tuple(range(1, a.ndim)))

"""DMD2's critic side: the GAN classification head that reads the fake-score U-Net's bottleneck.

The fake-score network of distribution matching is a U-Net trained to denoise the generator's
samples; DMD2 also reads its mid-block (bottleneck) features with a small classification head and
trains both as a diffusion GAN's discriminator: real training latents against generator samples,
each noised to a random timestep. `Bottleneck` keeps the mid-block output of every forward of the
U-Net it watches, so one U-Net call gives the denoising output and the head's input together.
"""

from __future__ import annotations

import diffusers
import torch
from torch import nn



class GANHead(nn.Module):
    """Real/fake logit from bottleneck features [N, C, h, w]: conv, norm, SiLU, global pool, linear."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels),
                                  nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """One logit per sample [N] (positive: judged a real latent)."""
        return self.body(features).squeeze(1)

    @classmethod
    def for_unet(cls, unet: diffusers.UNet2DConditionModel) -> GANHead:
        """A head sized for `unet`'s bottleneck (its last block width and its norm groups)."""
        return cls(unet.config.block_out_channels[-1], unet.config.norm_num_groups)


class Bottleneck:
    """The mid-block output of the last forward of a U-Net with a mid block (a hook, so wrappers such as
    DDP keep working; the dmd pass refuses a teacher without one before building this)."""

    def __init__(self, unet: diffusers.UNet2DConditionModel) -> None:
        self._last: torch.Tensor | None = None
        unet.mid_block.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._last = output

    def take(self) -> torch.Tensor:
        """The features of the last forward, handed over once (so a stale tensor is never read twice)."""
        if self._last is None:
            raise RuntimeError("no U-Net forward since the bottleneck features were last taken")
        out, self._last = self._last, None
        return out

"""Fine-tune the VAE decoder with the encoder frozen: the latent space (and so the U-Net) is kept.

Every generated image passes through the decoder, so its blur is a floor under every FID the
teacher and its students can reach. Stable Diffusion sharpened its decoder the same way (the
ft-EMA / ft-MSE decoders); lacking LPIPS weights here, the perceptual term is a hinge-loss
PatchGAN discriminator, as in the original KL autoencoder's training.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torch import nn

from ..training import LoopSpec, autocast, run_loop


class PatchDiscriminator(nn.Module):
    """Three stride-2 convolutions then a 1-channel map: one real/fake logit per image patch."""

    def __init__(self, channels: int = 3, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(2):
            c = width * 2 ** i
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(32, 2 * c), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(4 * width, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def finetune_decoder(vae: diffusers.AutoencoderKL, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                     steps: int, batch: int, lr: float, adv_weight: float, seed: int, work: Path,
                     warmup: int = 100, ema_decay: float = 0.999, checkpoint_every: int = 500,
                     time_limit_s: float | None = None, progress: bool = True) -> bool:
    """Train `vae`'s decoder (in place, EMA weights at the end) to rebuild `images` from posterior
    samples `mean + std * noise`, the latents the U-Net learns to produce.

    Loss: L1 + L2, plus `adv_weight` times a hinge generator loss when `adv_weight > 0` (the
    discriminator trains on the same step, on detached reconstructions). True when finished.
    """
    device = images.device
    torch.manual_seed(seed + 2)
    parts = nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv})
    if adv_weight > 0:
        parts["disc"] = PatchDiscriminator(images.shape[1]).to(device)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    ema = EMAModel(parts.parameters(), decay=ema_decay, use_ema_warmup=True, power=3 / 4,
                   foreach=device.type == "cuda")
    n = len(images)

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(n, (batch,), generator=g, device=device)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g, device=device)
        x = images[idx]
        with autocast(device):
            rec = vae.decode(z).sample.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        if adv_weight > 0:
            loss = loss + adv_weight * _generator_loss(parts["disc"], rec) + _discriminator_loss(parts["disc"], x, rec)
        return loss

    spec = LoopSpec("decoder", steps, work, seed + 2, checkpoint_every, time_limit_s, batch_size=batch)
    done = run_loop(spec, parts, loss_fn, lr, warmup, ema=ema, progress=progress)
    if done:
        ema.copy_to(parts.parameters())
    return done


def _generator_loss(disc: nn.Module, rec: torch.Tensor) -> torch.Tensor:
    """-D(rec) with the discriminator's weights held fixed, so this term only moves the decoder."""
    frozen = {name: p.detach() for name, p in disc.named_parameters()}
    with autocast(rec.device):
        logits = torch.func.functional_call(disc, frozen, (rec,))
    return -logits.float().mean()


def _discriminator_loss(disc: nn.Module, real: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Hinge loss on real images and detached reconstructions: only moves the discriminator."""
    with autocast(real.device):
        real_logits, fake_logits = disc(real).float(), disc(rec.detach()).float()
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())

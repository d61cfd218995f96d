"""What step distillation trains on: real images as latents of the teacher's VAE, and captions.

The built-in data are Fashion-MNIST's training images in the teacher's image space with the
teacher's caption templates (`pocketdiff.data`). Latents are encoded once per stage and kept in
the stage's work folder, so a resumed stage does not re-encode. Text states come from the teacher's
text encoder or, on a host without its weights (the GPU host), from a states file precomputed for
the caption set (`$POCKETDIFF_TEXT_STATES`, made by `pocketdiff.teacher.train.caption_table`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ... import distributed
from ...bundle import Bundle
from ...data import TEMPLATES, caption_set, load_fashion_mnist, to_model_images
from ...errors import ConfigError, DataError
from ...training import autocast
from ...vae import posterior

TEXT_STATES_ENV = "POCKETDIFF_TEXT_STATES"
LATENTS_FILE = "latents.safetensors"


def text_states(bundle: Bundle, prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """Text-encoder states [N, 77, D] of `prompts`: the Bundle's encoder, else the precomputed states file."""
    if bundle.text_encoder is not None and bundle.tokenizer is not None:
        from ...sampler import encode_prompts

        encoder = bundle.text_encoder.to(device)
        return torch.cat([encode_prompts(bundle.tokenizer, encoder, prompts[i:i + 64], device)
                          for i in range(0, len(prompts), 64)]).float()
    cache = os.environ.get(TEXT_STATES_ENV)
    if not cache:
        raise ConfigError(f"the teacher has no text encoder; set {TEXT_STATES_ENV} to a states file of its captions")
    from ...teacher.train import caption_table

    table = caption_table(Path(cache))
    missing = [p for p in prompts if p not in table]
    if missing:
        raise DataError(f"{cache}: no text states for caption {missing[0]!r}")
    return torch.stack([table[p] for p in prompts]).float().to(device)


@dataclass
class LatentData:
    """Posterior latents of the training images, their labels, and the states of every caption."""

    mean: torch.Tensor
    std: torch.Tensor
    labels: torch.Tensor
    states: torch.Tensor  # [len(caption_set()), 77, D]; row 0 is the empty caption
    scale: float

    def sample(self, g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A global batch: scaled latents z0, caption states, empty-caption states, class labels."""
        dev = self.mean.device
        idx = torch.randint(len(self.mean), (n,), generator=g, device=dev)
        z0 = (self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=g, device=dev)) * self.scale
        template = torch.randint(len(TEMPLATES), (n,), generator=g, device=dev)
        caption = 1 + self.labels[idx] * len(TEMPLATES) + template
        uncond = self.states[:1].expand(n, -1, -1)
        return z0, self.states[caption], uncond, self.labels[idx]


def load_latent_data(teacher: Bundle, work_dir: Path, device: torch.device, limit: int | None = None,
                     data_root: Path | None = None) -> LatentData:
    """The training latents under `teacher`'s VAE, encoded once and cached in `work_dir`."""
    cache = Path(work_dir) / LATENTS_FILE
    if cache.is_file():
        stored = load_file(str(cache))
        mean, std, labels = stored["mean"], stored["std"], stored["labels"]
    else:
        images, labels_np = load_fashion_mnist("train", data_root)
        if limit:
            images, labels_np = images[:limit], labels_np[:limit]
        mean, std = _encode(teacher, np.asarray(images), device)
        labels = torch.as_tensor(labels_np)
        if distributed.is_main():  # every process encoded the same latents; one keeps them
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            save_file({"mean": mean.contiguous(), "std": std.contiguous(), "labels": labels.contiguous()}, str(tmp))
            os.replace(tmp, cache)
        distributed.barrier()
    states = text_states(teacher, caption_set(), device)
    scale = float(teacher.vae.config.scaling_factor)
    return LatentData(mean.to(device).float(), std.to(device).float(), labels.to(device), states.to(device), scale)


@torch.no_grad()
def _encode(teacher: Bundle, images: np.ndarray, device: torch.device, batch: int = 1024
            ) -> tuple[torch.Tensor, torch.Tensor]:
    vae = teacher.vae.to(device).eval()
    means, stds = [], []
    for i in range(0, len(images), batch):
        x = to_model_images(images[i:i + batch], size=teacher.resolution).to(device)
        with autocast(device):
            mean, std = posterior(vae, x)
        means.append(mean.float().cpu())
        stds.append(std.float().cpu())
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()

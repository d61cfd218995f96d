"""Quality of a text-to-image Bundle on the Fashion-MNIST yardstick: FID, KID, prompt accuracy.

Generated images are compared with the real test set in Inception space; reference features are
computed once per split and cached. Every result states its sample count.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .bundle import Bundle
from .data import class_prompts, load_fashion_mnist, split_info, to_model_images
from .errors import ConfigError
from .fileio import atomic_write_bytes
from .metrics.classifier import FashionClassifier, load_classifier, prompt_accuracy
from .metrics.agreement import psnr, ssim
from .metrics.fid import (NEIGHBOURS, fid_from_features, inception_features, inception_path, kid, knn_radii,
                          load_inception, precision_recall)
from .sampler import Components, SampleConfig, as_saved, generate
from .vae import encode_latents

REPORTED_SAMPLES = 10_000


def cache_dir() -> Path:
    """Where reference features are cached ($POCKETDIFF_CACHE, else ~/.cache/pocketdiff)."""
    return Path(os.environ.get("POCKETDIFF_CACHE") or Path.home() / ".cache" / "pocketdiff")


def real_images(split: str, n: int | None = None, data_root: Path | None = None) -> torch.Tensor:
    """Real images of a split in the teacher's image space, [N, 3, 64, 64] in [0, 1]."""
    images, _ = load_fashion_mnist(split, data_root)
    images = np.array(images[:n])
    return (to_model_images(images) + 1) / 2


def check_count(what: str, n: int, available: int | None = None) -> None:
    """ConfigError unless 1 <= n (<= `available`, the images there are to take)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (available is not None and n > available):
        limit = f" and at most {available:,}" if available is not None else ""
        raise ConfigError(f"{what} must be an integer of at least 1{limit}, got {n!r}")


def reference_features(split: str, net: torch.jit.ScriptModule, n: int | None = None,
                       data_root: Path | None = None) -> np.ndarray:
    """Inception features of the first `n` (None: all) real images of `split`, cached on disk by network,
    count and the data file itself (so another --data folder never reuses these features)."""
    available, data_id = split_info(split, data_root)
    if n is not None:
        check_count(f"the number of real {split} images", n, available)
    net_id = hashlib.sha256(inception_path().read_bytes()[:1 << 20]).hexdigest()[:12]
    path = cache_dir() / f"fid_{split}_{n or 'all'}_{net_id}_{data_id}.npy"
    if path.is_file():
        return np.load(path)
    feats = inception_features(real_images(split, n, data_root), net)
    buf = io.BytesIO()
    np.save(buf, feats)
    atomic_write_bytes(path, buf.getvalue())
    return feats


@dataclass
class Yardstick:
    """The networks and reference features every evaluation shares."""

    inception: torch.jit.ScriptModule
    classifier: FashionClassifier
    reference: np.ndarray

    @cached_property
    def reference_radii(self) -> torch.Tensor:
        """The reference features' 3-NN radii, computed once for every score."""
        return knn_radii(self.reference)

    @classmethod
    def load(cls, device: str | torch.device = "cpu", reference_n: int | None = None,
             data_root: Path | None = None, classifier: Path | None = None) -> Yardstick:
        net = load_inception(device)
        return cls(net, load_classifier(classifier, device=device),
                   reference_features("test", net, reference_n, data_root))

    def score(self, images: torch.Tensor, labels: list[int] | None = None) -> dict:
        """FID, KID, precision/recall (k = 3) and (given labels) prompt accuracy of images [N, 3, H, W] in
        [0, 1], scored as the 8-bit PNGs a user saves (`sampler.as_saved`), so the figures hold for the files
        people keep."""
        images = as_saved(images)
        feats = inception_features(images, self.inception)
        kid_mean, kid_std = kid(feats, self.reference, subset_size=min(1000, len(feats)))
        out = {"samples": len(images), "reference_samples": len(self.reference),
               "fid": fid_from_features(feats, self.reference), "kid": kid_mean, "kid_std": kid_std}
        if len(feats) > NEIGHBOURS:
            out["precision"], out["recall"] = precision_recall(self.reference, feats, real_radii=self.reference_radii)
        if labels is not None:
            out["prompt_accuracy"] = prompt_accuracy(self.classifier, images, labels)
        return out


def floor(yardstick: Yardstick, n: int, data_root: Path | None = None) -> dict:
    """FID/KID of `n` real train images against the reference: the best a model can score at that count."""
    check_count("the sample count", n)
    feats = reference_features("train", yardstick.inception, n, data_root)
    kid_mean, _ = kid(feats, yardstick.reference, subset_size=min(1000, n))
    return {"samples": n, "fid": fid_from_features(feats, yardstick.reference), "kid": kid_mean,
            "what": f"real train (first {n}) vs real test"}


@torch.no_grad()
def autoencoder_floor(bundle: Bundle, yardstick: Yardstick, n: int, data_root: Path | None = None,
                      batch: int = 500) -> dict:
    """FID/KID of `n` real train images passed through the bundle's VAE (encode, decode) against the
    reference: the best the latent model can score, since every sample goes through that decoder."""
    vae = bundle.vae
    param = next(vae.parameters())
    images = real_images("train", n, data_root)
    out = []
    for i in range(0, n, batch):
        x = images[i:i + batch].to(param.device, param.dtype) * 2 - 1
        out.append(((vae.decode(encode_latents(vae, x)).sample.float() + 1) / 2).clamp(0, 1).cpu())
    result = yardstick.score(torch.cat(out))
    return {**result, "what": f"real train (first {n}) through the VAE vs real test"}


def agreement(bundle: Bundle, reference: Bundle, n: int, config: SampleConfig, progress: bool = True) -> dict:
    """PSNR and SSIM of `bundle`'s images against `reference`'s for the same prompts and seeds."""
    check_count("the sample count", n)
    prompts, _ = class_prompts(max(1, n // 10))
    ours = generate(bundle, prompts[:n], config, progress=progress)
    theirs = generate(reference, prompts[:n], config, progress=progress)
    return {"samples": len(ours), "psnr_db": psnr(ours, theirs), "ssim": ssim(ours, theirs)}


def evaluate(bundle: Bundle, yardstick: Yardstick, n: int, config: SampleConfig,
             components: Components | None = None, progress: bool = True) -> dict:
    """Generate `n` images cycling over the ten class prompts and score them."""
    check_count("the sample count", n)
    prompts, labels = class_prompts(max(1, n // 10))
    t0 = time.monotonic()
    images = generate(bundle, prompts[:n], config, components, progress)
    result = yardstick.score(images, labels[:n])
    result.update(scheduler=config.scheduler, steps=config.steps, guidance_scale=config.guidance_scale,
                  seed=config.seed, seconds=round(time.monotonic() - t0, 1))
    return result

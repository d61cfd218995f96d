"""Sweep the VAE's KL weight: reconstruction vs how gracefully the decoder takes latent noise.

The first teacher's VAE (KL weight 1e-6) reconstructs well but turns latent noise of 0.2 (scaled
units) into speckle, which is what its diffusion samples showed. This trains one VAE per weight
and prints the trade-off; each VAE is saved under OUT/kl_<weight>/ for `train teacher --vae-from`.
Usage: python bench/vae_kl_sweep.py --out OUT --kl-weight 1e-4 [--data DIR] [--steps N]
(run one process per weight; they share a GPU well).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pocketdiff.data import load_fashion_mnist, to_model_images
from pocketdiff.fileio import atomic_write_json
from pocketdiff.teacher.config import TrainConfig
from pocketdiff.teacher.train import encode_latents, train_vae, vae_diagnostics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--kl-weight", type=float, required=True)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=TrainConfig.vae_steps)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    images = to_model_images(load_fashion_mnist("train", args.data)[0]).to(dev)
    test = images[:1000]  # the VAE sees 60,000 images; 1,000 of them suffice for a diagnostic
    cfg = TrainConfig(vae_steps=args.steps, vae_kl_weight=args.kl_weight, warmup=200)
    folder = args.out / f"kl_{args.kl_weight:g}"
    vae, _ = train_vae(images, cfg, folder / "work", dev, progress=False)
    mean, _ = encode_latents(vae, images[:20000])
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    tmean, tstd = encode_latents(vae, test)
    result = {"kl_weight": args.kl_weight, "steps": args.steps, "latent_scale": scale,
              **vae_diagnostics(vae, test, tmean, tstd, scale), "split": "train[:1000]"}
    vae.half().save_pretrained(folder / "vae")
    atomic_write_json(folder / "result.json", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""PSNR of a light decoder's images against the teacher decoder's, on the latents the U-Net samples.

Issue 15's decoder check (PSNR >= 28 dB on sampled latents). MODEL (a Bundle whose VAE is the light
decoder, e.g. a `light-decoder` stage) samples latents with its own U-Net and sampler settings (what its
decoder is fed in use) on the class prompts, image i seeded SEED + i (default far from the seeds the pass
trained on); each batch is decoded by MODEL's VAE and by TEACHER's (the decoder it was fitted to), both as
the 8-bit images a user saves, and compared: PSNR over all images, the worst image's, and SSIM. Figures go
to docs/BENCHMARKS.md ("Slimming").
Usage: python bench/light_decoder_quality.py MODEL [--teacher fashion] [--n 1000] [--steps S] [--guidance G]
       [--seed 1000000] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from pocketdiff.bundle import Bundle
from pocketdiff.compress.distill.data import TEXT_STATES_ENV
from pocketdiff.data import class_prompts
from pocketdiff.errors import ConfigError
from pocketdiff.metrics.agreement import psnr, ssim
from pocketdiff.sampler import CachedTextComponents, SampleConfig, TorchComponents, as_saved, latent_batches
from pocketdiff.sources import load_model
from pocketdiff.teacher.train import caption_table
from pocketdiff.zoo import load_minilm, load_tokenizer

HELD_OUT_SEED = 1_000_000  # the pass samples its training latents from its own seed (default 0) upward


def sampling_components(bundle: Bundle, device: torch.device) -> TorchComponents:
    """Components with text states: the Bundle's encoder, else `$POCKETDIFF_TEXT_STATES`, else MiniLM (run
    folders of the built-in model carry no text encoder)."""
    if bundle.text_encoder is None and os.environ.get(TEXT_STATES_ENV):
        return CachedTextComponents(bundle, caption_table(Path(os.environ[TEXT_STATES_ENV])), device)
    if bundle.text_encoder is None:
        bundle.text_encoder, bundle.tokenizer = load_minilm(), load_tokenizer()
    return TorchComponents(bundle.to(device), device)


@torch.no_grad()
def measure(model: Bundle, teacher: Bundle, n: int, config: SampleConfig, device: torch.device,
            progress: bool = True) -> dict:
    """PSNR (all images, worst image) and SSIM of `model`'s decoder against `teacher`'s on `model`'s latents."""
    if model.vae.config.latent_channels != teacher.vae.config.latent_channels:
        raise ConfigError(f"the light decoder takes {model.vae.config.latent_channels} latent channels, the "
                          f"teacher's {teacher.vae.config.latent_channels}: not a decoder of this teacher")
    ours = sampling_components(model, device)
    theirs = CachedTextComponents(teacher.to(device), {}, device)  # decodes only: no text states needed
    prompts = class_prompts(-(-n // 10))[0][:n]
    light, reference = [], []
    for latents in latent_batches(model, prompts, config, ours, progress):
        light.append(as_saved((ours.decode(latents) / 2 + 0.5).clamp(0, 1)))
        reference.append(as_saved((theirs.decode(latents) / 2 + 0.5).clamp(0, 1)))
    a, b = torch.cat(light), torch.cat(reference)
    return {"samples": len(a), "psnr_db": psnr(a, b), "worst_image_psnr_db": min(psnr(x, y) for x, y in zip(a, b)),
            "ssim": ssim(a, b), "scheduler": config.scheduler, "steps": config.steps,
            "guidance_scale": config.guidance_scale, "seed": config.seed}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a Bundle whose VAE is the light decoder")
    ap.add_argument("--teacher", default="fashion", help="the model whose decoder the light one was fitted to")
    ap.add_argument("--n", type=int, default=1000, help="images (class prompts in turn)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: MODEL's own)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: MODEL's own)")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    model, teacher = load_model(args.model), load_model(args.teacher)
    config = SampleConfig.for_bundle(model, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                     batch_size=args.batch_size)
    result = measure(model, teacher, args.n, config, torch.device(args.device), progress=False)
    print(f"{args.model} decoder vs {args.teacher}'s on {result['samples']} sampled latents ({config.scheduler} "
          f"x{config.steps}, guidance {config.guidance_scale:g}, seeds {config.seed}+i, 8-bit images): "
          f"PSNR {result['psnr_db']:.2f} dB, worst image {result['worst_image_psnr_db']:.2f} dB, "
          f"SSIM {result['ssim']:.4f}")
    return result


if __name__ == "__main__":
    main()

"""Train the "fashion" teacher: the VAE first, then the U-Net on the VAE's latents.

Runs on CPU or CUDA with no code change (bf16 autocast on CUDA). Every phase checkpoints and
resumes; the finished pipeline is written as a diffusers folder with fp16 weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from ..bundle import Bundle, Manifest
from ..data import TEMPLATES, caption_set, load_fashion_mnist, to_model_images
from ..errors import DataError
from ..training import LoopSpec, autocast, run_loop
from .config import SCHEDULER, UNET, VAE, TrainConfig
from .decoder import finetune_decoder



def caption_table(cache: Path | None = None, captions: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Caption -> token states, for `CachedTextComponents`: read from `cache`, else encoded (and cached)."""
    if cache is not None and cache.is_file():
        stored, states = _read_cache(cache)
        return dict(zip(stored, states))
    captions = captions or caption_set()
    states = _encode(captions)
    if cache is not None:
        blob = torch.frombuffer(bytearray(json.dumps(captions).encode()), dtype=torch.uint8)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"states": states.half().contiguous(), "captions_json": blob}, str(cache))
        return caption_table(cache)
    return dict(zip(captions, states))


def caption_embeddings(cache: Path | None = None) -> torch.Tensor:
    """MiniLM token states [len(caption_set()), 77, 384] of every training caption, in caption_set() order."""
    table = caption_table(cache)
    missing = [c for c in caption_set() if c not in table]
    if missing:
        raise DataError(f"{cache}: caption cache lacks training caption {missing[0]!r}; delete it to rebuild")
    return torch.stack([table[c] for c in caption_set()])


def _read_cache(cache: Path) -> tuple[list[str], torch.Tensor]:
    data = load_file(str(cache))
    return json.loads(data["captions_json"].numpy().tobytes().decode()), data["states"].float()


def _encode(captions: list[str]) -> torch.Tensor:
    from ..sampler import encode_prompts
    from ..zoo import load_minilm, load_tokenizer

    tokenizer, encoder = load_tokenizer(), load_minilm()
    return torch.cat([encode_prompts(tokenizer, encoder, captions[i:i + 32]) for i in range(0, len(captions), 32)])


def train_vae(images: torch.Tensor, cfg: TrainConfig, work: Path, device: torch.device,
              progress: bool = True) -> tuple[diffusers.AutoencoderKL, bool]:
    """Reconstruction (L1 + L2) plus a small KL term; returns the VAE and whether it finished."""
    torch.manual_seed(cfg.seed)
    vae = diffusers.AutoencoderKL(**VAE).to(device)
    n = len(images)

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        x = images[torch.randint(n, (cfg.vae_batch,), generator=g, device=device)]
        with autocast(device):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=device)
            rec = vae.decode(z).sample.float()
        kl = post.kl().mean() / x[0].numel()
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.vae_kl_weight * kl

    spec = LoopSpec("vae", cfg.vae_steps, work, cfg.seed, cfg.checkpoint_every, cfg.time_limit,
                    batch_size=cfg.vae_batch)
    done = run_loop(spec, vae, loss_fn, cfg.vae_lr, cfg.warmup, progress=progress)
    return vae.eval(), done


@torch.no_grad()
def encode_latents(vae: diffusers.AutoencoderKL, images: torch.Tensor, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (fp32)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i:i + batch]).latent_dist
        means.append(post.mean.float())
        stds.append(post.std.float())
    return torch.cat(means), torch.cat(stds)


def load_vae(folder: Path) -> diffusers.AutoencoderKL:
    """A trained VAE from a pipeline folder (its vae/) or a VAE folder, in fp32, eval mode."""
    folder = Path(folder)
    sub = folder / "vae" if (folder / "vae").is_dir() else folder
    if not (sub / "config.json").is_file():
        raise DataError(f"{folder}: no VAE here (expected config.json in it or in its vae/ folder)")
    return diffusers.AutoencoderKL.from_pretrained(sub).float().eval()


@torch.no_grad()
def vae_diagnostics(vae: diffusers.AutoencoderKL, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                    scale: float, seed: int = 0) -> dict[str, float]:
    """How well the VAE reconstructs, and how gracefully its decoder takes latent noise.

    A decoder that turns small latent errors into speckle makes every diffusion sample speckled;
    `noisy_l1_*` is the reconstruction L1 after Gaussian noise of that std (in scaled-latent units).
    """
    g = torch.Generator(mean.device).manual_seed(seed)
    out = {"vae_recon_l1": float(F.l1_loss(vae.decode(mean).sample.float(), images)),
           "posterior_std_scaled": float((std * scale).mean())}
    for sigma in (0.1, 0.2):
        noise = torch.randn(mean.shape, generator=g, device=mean.device) * sigma / scale
        out[f"noisy_l1_{sigma}"] = float(F.l1_loss(vae.decode(mean + noise).sample.float(), images))
    return out


def train_unet(mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, states: torch.Tensor,
               scale: float, cfg: TrainConfig, work: Path, device: torch.device,
               progress: bool = True, init: Path | None = None) -> tuple[diffusers.UNet2DConditionModel, bool]:
    """Epsilon prediction with min-SNR-5 weighting and caption dropout; returns the EMA U-Net.
    `init` (a pipeline folder) starts from its U-Net weights instead of random ones."""
    torch.manual_seed(cfg.seed + 1)
    unet = diffusers.UNet2DConditionModel(**UNET)
    if init is not None:
        unet.load_state_dict(diffusers.UNet2DConditionModel.from_pretrained(Path(init) / "unet").float().state_dict())
    unet = unet.to(device)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4,
                   foreach=device.type == "cuda")  # one fused update instead of ~400 small kernels a step
    sched = diffusers.DDPMScheduler.from_config(SCHEDULER)
    alphas = sched.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr
    n = len(mean)

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(n, (cfg.unet_batch,), generator=g, device=device)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g, device=device)) * scale
        template = torch.randint(len(TEMPLATES), (cfg.unet_batch,), generator=g, device=device)
        cap = 1 + labels[idx] * len(TEMPLATES) + template
        drop = torch.rand(cfg.unet_batch, generator=g, device=device) < cfg.uncond_prob
        ctx = states[torch.where(drop, torch.zeros_like(cap), cap)]
        t = torch.randint(sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g, device=device)
        noise = torch.randn(z.shape, generator=g, device=device)
        zt = sched.add_noise(z, noise, t)
        with autocast(device):
            pred = unet(zt, t, encoder_hidden_states=ctx).sample.float()
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        return (per * weight[t]).mean()

    spec = LoopSpec("unet", cfg.unet_steps, work, cfg.seed + 1, cfg.checkpoint_every, cfg.time_limit,
                    batch_size=cfg.unet_batch)
    done = run_loop(spec, unet, loss_fn, cfg.unet_lr, cfg.warmup, ema=ema, progress=progress)
    ema.copy_to(unet.parameters())
    return unet.eval(), done


def train_teacher(out: Path, cfg: TrainConfig, data_root: Path | None = None, captions_cache: Path | None = None,
                  device: str | None = None, data_limit: int | None = None, progress: bool = True,
                  vae_from: Path | None = None, unet_from: Path | None = None) -> dict:
    """Train VAE (or take the one in pipeline folder `vae_from`), fine-tune its decoder when
    `cfg.decoder_steps` > 0, then the U-Net; write the pipeline
    (fp16, EMA weights) to `out` (`unet_from`: a pipeline folder whose U-Net to continue from), also when the time limit stopped the U-Net early (the summary
    says so and a rerun resumes). Returns a summary."""
    out = Path(out)
    work = out.parent / f".{out.name}.train"
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    images_u8, labels_np = load_fashion_mnist("train", data_root)
    if data_limit:
        images_u8, labels_np = images_u8[:data_limit], labels_np[:data_limit]
    images = to_model_images(images_u8).to(dev)
    labels = torch.as_tensor(labels_np, device=dev)
    states = caption_embeddings(captions_cache).to(dev)
    summary: dict = {"device": str(dev), "config": cfg.as_dict(), "train_images": len(images)}
    if dev.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(dev)

    t0 = time.monotonic()
    if vae_from is not None:
        vae = load_vae(vae_from).to(dev)
        summary["vae_from"] = str(vae_from)
    else:
        vae, done = train_vae(images, cfg, work, dev, progress)
        summary["vae_seconds"] = round(time.monotonic() - t0, 1)
        if not done:
            return {**summary, "finished": False, "stopped_in": "vae"}
    with autocast(dev):
        mean, std = encode_latents(vae, images)
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    if cfg.decoder_steps > 0:
        t_dec = time.monotonic()
        summary["before_decoder_finetune"] = vae_diagnostics(vae, images[:1000], mean[:1000], std[:1000], scale)
        done = finetune_decoder(vae, images, mean, std, cfg.decoder_steps, cfg.decoder_batch, cfg.decoder_lr,
                                cfg.decoder_adv_weight, cfg.seed, work, cfg.warmup, time_limit_s=cfg.time_limit,
                                checkpoint_every=cfg.checkpoint_every, progress=progress)
        summary["decoder_seconds"] = round(time.monotonic() - t_dec, 1)
        if not done:
            return {**summary, "finished": False, "stopped_in": "decoder"}
    summary.update(latent_scale=scale, **vae_diagnostics(vae, images[:1000], mean[:1000], std[:1000], scale))

    t1 = time.monotonic()
    if unet_from is not None:
        summary["unet_from"] = str(unet_from)
    unet, done = train_unet(mean, std, labels, states, scale, cfg, work, dev, progress, init=unet_from)
    summary["unet_seconds"] = round(time.monotonic() - t1, 1)
    summary["unet_steps_done"] = _last_step(work / "unet.ckpt")
    summary["final_loss"] = {p: _last_loss(work / f"{p}_log.jsonl") for p in ("vae", "decoder", "unet")}
    summary["finished"] = done
    bundle = Bundle(unet=unet.half().cpu(), vae=vae.half().cpu(), scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER),
                    manifest=Manifest(source={"kind": "trained", "name": "fashion", "summary": summary}))
    bundle.save(out)
    return summary


def _last_step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"]) if ckpt.is_file() else 0


def _last_loss(log_file: Path) -> float | None:
    lines = log_file.read_text().strip().splitlines() if log_file.is_file() else []
    return json.loads(lines[-1])["loss"] if lines else None

"""A TAESD-style light VAE decoder (Conv/ReLU/Upsample only), fitted to the teacher's decoder.

The network is diffusers' own `AutoencoderTiny` (TAESD's layout: `DecoderTiny` of conv + ReLU
blocks and nearest upsampling, one per level of the teacher's VAE), so the Bundle's `vae/` folder
is a stock diffusers class: `StableDiffusionPipeline.from_pretrained` loads it and decodes with it,
and pocketdiff's sampler calls the same `vae.decode`. Like TAESD its `scaling_factor` is 1.0: it
decodes the U-Net's (scaled) latents directly, which keeps its input near unit variance for any
teacher (DecoderTiny's input clamp, tanh(x/3)·3, assumes that).

`AutoencoderTiny` holds a tiny encoder too, and a Bundle has one `vae` slot, so the teacher's KL
encoder cannot stay in the same folder: the pass trains the tiny encoder alongside, to invert the
teacher's decoder into the teacher's latent space (E(D_teacher(z)) ≈ z), so encode → decode stays in
the latent space the U-Net was trained on. Training data are posterior samples of the teacher's
encoder on the training images (`compress.distill.data`) and, for a `sampled_share` of each batch,
the latents the U-Net actually hands the decoder: the Bundle's own sampler run on the training captions
(each image seeded seed + i), drawn once and cached in the work folder, so a resumed run trains on the
same latents as an uninterrupted one. Losses are L1 + L2 to the teacher decoder's image plus a hinge adversarial term from a PatchGAN critic (its own optimizer on the
shared Trainer), as TAESD and the teacher's own decoder fine-tune (`pocketdiff.teacher.decoder`) do.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F

from safetensors.torch import load_file, save_file

from ... import distributed
from ...bundle import Bundle, read_json
from ...data import caption_set
from ...errors import ConfigError
from ...passes import PassContext, PassResult, register_pass
from ...sampler import CachedTextComponents, SampleConfig, latent_batches
from ...settings import setting
from ...teacher.decoder import PatchDiscriminator
from ...training import LoopSpec, OptimizerSpec, StepContext, Trainer, autocast
from ...vae import decoder_params
from ..distill.data import LatentData, load_latent_data

SAMPLED_FILE = "sampled_latents.safetensors"


class LightPair(torch.nn.Module):
    """The light VAE's two halves in one forward, so a DDP wrapper sees (and syncs) both."""

    def __init__(self, tiny: diffusers.AutoencoderTiny) -> None:
        super().__init__()
        self.tiny = tiny

    def forward(self, z: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tiny.decoder(z), self.tiny.encoder(image)


def _levels(vae: torch.nn.Module) -> int:
    return len(vae.config.block_out_channels)


def light_vae_config(vae: torch.nn.Module, width: int, blocks: list[int] | None) -> dict:
    """The AutoencoderTiny config for a VAE: one level per teacher level, `width` channels throughout."""
    n = _levels(vae)
    per_level = list(blocks) if blocks else ([3] * (n - 1) + [1])  # TAESD's (3, 3, 3, 1) for n levels
    if len(per_level) != n:
        raise ConfigError(f"light decoder blocks {per_level} must give one count per level of the VAE ({n} levels, "
                          f"{2 ** (n - 1)}x upsampling)")
    return {"in_channels": vae.config.out_channels, "out_channels": vae.config.out_channels,
            "latent_channels": vae.config.latent_channels,
            "encoder_block_out_channels": [width] * n, "decoder_block_out_channels": [width] * n,
            "num_encoder_blocks": [1] + per_level[:-1][::-1], "num_decoder_blocks": per_level,
            "scaling_factor": 1.0, "shift_factor": 0.0}


def check_light_start(vae: torch.nn.Module, init: Path | None, latent_channels: int | None) -> None:
    """ConfigError when the light decoder's latent channels or levels do not match the VAE's."""
    want = vae.config.latent_channels
    if latent_channels is not None and latent_channels != want:
        raise ConfigError(f"light decoder latent_channels is {latent_channels}, but the VAE's latents have {want} "
                          "channels: the decoder must take the U-Net's latents")
    if init is None:
        return
    config_file = Path(init) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{init}: not an AutoencoderTiny folder (no config.json)")
    config = read_json(config_file)
    if config.get("_class_name") != "AutoencoderTiny":
        raise ConfigError(f"{init}: holds a {config.get('_class_name')}, not an AutoencoderTiny")
    if config.get("latent_channels", 4) != want:
        raise ConfigError(f"{init}: its decoder takes {config.get('latent_channels', 4)} latent channels, but this "
                          f"VAE has {want}")
    levels = len(config.get("decoder_block_out_channels", (64,) * 4))
    if levels != _levels(vae):
        raise ConfigError(f"{init}: its decoder upsamples {2 ** (levels - 1)}x, this VAE {2 ** (_levels(vae) - 1)}x")


def start_light_vae(vae: torch.nn.Module, s: LightDecoderPass.Settings) -> diffusers.AutoencoderTiny:
    """The untrained light VAE: from `s.init` (e.g. a local TAESD folder) or freshly initialised."""
    if s.init is not None:
        tiny = diffusers.AutoencoderTiny.from_pretrained(s.init, use_safetensors=True, local_files_only=True)
        tiny.register_to_config(scaling_factor=1.0, shift_factor=0.0)
        return tiny
    torch.manual_seed(s.seed)
    return diffusers.AutoencoderTiny(**light_vae_config(vae, s.width, s.blocks))


@register_pass
class LightDecoderPass:
    """Replace the VAE with a TAESD-style AutoencoderTiny fitted to the teacher's decoder."""

    name = "light-decoder"

    @dataclass
    class Settings:
        width: int = setting(64, min=1, help="channels of every decoder level (TAESD: 64)")
        blocks: list[int] = setting(default_factory=list, min=1, help="conv blocks per level, outer levels first "
                                                                      "(default TAESD's: 3 per level, 1 last)")
        latent_channels: int | None = setting(None, min=1, help="expected latent channels (default: the VAE's)")
        init: Path | None = setting(None, help="an AutoencoderTiny folder to start from (e.g. TAESD's weights)")
        iterations: int = setting(2000, min=1)
        batch_size: int = setting(64, min=1, help="global batch (split over processes)")
        lr: float = setting(2e-4, min=0.0, min_exclusive=True)
        warmup: int = setting(100, min=0)
        l2_weight: float = setting(1.0, min=0.0)
        adv_weight: float = setting(0.05, min=0.0, help="hinge generator loss weight (0: no critic)")
        adv_start: int = setting(500, min=0, help="steps of reconstruction only before the critic joins")
        encoder_weight: float = setting(1.0, min=0.0, help="weight of the tiny encoder's latent loss")
        data_limit: int | None = setting(None, min=1, help="first N training images only (tests)")
        sampled_share: float = setting(0.0, min=0.0, max=1.0, help="share of each batch drawn from latents the "
                                       "Bundle's own sampler produces on the training captions (0: encoded only)")
        sampled_count: int = setting(1024, min=1, help="how many sampled latents to draw once and cache")
        sample_steps: int | None = setting(None, min=1, help="sampler steps for them (default: the Bundle's own)")
        sample_guidance: float | None = setting(None, min=0.0, help="guidance scale for them (default: the "
                                                "Bundle's own)")
        checkpoint_every: int = setting(500, min=1)
        log_every: int = setting(50, min=1)
        seed: int = setting(0, min=0)

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        if not isinstance(bundle.vae, diffusers.AutoencoderKL):
            raise ConfigError(f"light-decoder fits a light decoder to a KL VAE's decoder; this model's VAE is a "
                              f"{type(bundle.vae).__name__} (already light?)")
        check_light_start(bundle.vae, s.init, s.latent_channels)
        light_vae_config(bundle.vae, s.width, s.blocks)
        if s.sampled_share > 0 and round(s.sampled_share * s.batch_size) == 0:
            raise ConfigError(f"sampled_share {s.sampled_share:g} of a batch of {s.batch_size} is no latent at all: "
                              "raise it (or the batch size), or set it to 0")
        if s.sampled_share > 0:
            sample_config(bundle, s)

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        run = build_light_decoder(bundle, s, ctx.work_dir, ctx.device, ctx.deadline, ctx.progress)
        if not run.trainer.fit(run.step):
            return PassResult(None, {"steps_done": run.trainer.step}, finished=False)
        tiny = run.tiny.cpu().eval().requires_grad_(False)
        before = decoder_params(bundle.vae)
        bundle.vae = tiny
        return PassResult(bundle, {"decoder_params_before": before, "decoder_params_after": decoder_params(tiny),
                                   "steps": s.iterations})


def sample_config(bundle: Bundle, s: LightDecoderPass.Settings) -> SampleConfig:
    """The Bundle's own sampler settings (`sample_steps` / `sample_guidance` over them), seeded `s.seed`."""
    return SampleConfig.for_bundle(bundle, steps=s.sample_steps, guidance_scale=s.sample_guidance, seed=s.seed,
                                   batch_size=min(s.batch_size, s.sampled_count))


def sampled_latents(bundle: Bundle, data: LatentData, s: LightDecoderPass.Settings, work_dir: Path,
                    dev: torch.device, progress: bool = True) -> torch.Tensor:
    """`s.sampled_count` scaled latents from the Bundle's sampler on the training captions (in turn), made once
    by the main process and cached in `work_dir`: every process, and every resumed call, reads the same file."""
    cache = Path(work_dir) / SAMPLED_FILE
    if not cache.is_file() and distributed.is_main():
        captions = caption_set()
        bundle.unet.to(dev).eval()
        components = CachedTextComponents(bundle, dict(zip(captions, data.states)), dev)
        prompts = [captions[1 + i % (len(captions) - 1)] for i in range(s.sampled_count)]
        latents = torch.cat([z.float().cpu() for z in latent_batches(bundle, prompts, sample_config(bundle, s),
                                                                         components, progress)])
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({"latents": latents.contiguous()}, str(tmp))
        os.replace(tmp, cache)
    distributed.barrier()
    return load_file(str(cache))["latents"].to(dev)


@dataclass
class LightDecoderRun:
    """A built light-decoder run: the trainer, its step, the batch draw it trains on, and the light VAE."""

    trainer: Trainer
    step: Callable[[StepContext], None]
    draw: Callable[[torch.Generator], torch.Tensor]
    tiny: diffusers.AutoencoderTiny


def build_light_decoder(bundle: Bundle, s: LightDecoderPass.Settings, work_dir: Path, dev: torch.device,
                        deadline: float | None = None, progress: bool = True) -> LightDecoderRun:
    """Everything a light-decoder run needs, ready for `trainer.fit(step)` (the pass and the tests run it)."""
    teacher_vae = bundle.vae.to(dev).eval().requires_grad_(False)
    data = load_latent_data(bundle, work_dir, dev, s.data_limit)
    sampled = sampled_latents(bundle, data, s, work_dir, dev, progress) if s.sampled_share > 0 else None
    n_sampled = round(s.sampled_share * s.batch_size) if sampled is not None else 0

    def draw(g: torch.Generator) -> torch.Tensor:
        """A global batch of scaled latents: encoded ones first, then `n_sampled` from the sampler's cache."""
        z = data.sample(g, s.batch_size - n_sampled)[0]
        if not n_sampled:
            return z
        return torch.cat([z, sampled[torch.randint(len(sampled), (n_sampled,), generator=g, device=dev)]])

    tiny = start_light_vae(teacher_vae, s).to(dev).requires_grad_(True)
    torch.manual_seed(s.seed + 1)
    critic = PatchDiscriminator(teacher_vae.config.out_channels).to(dev)
    spec = LoopSpec("light_decoder", s.iterations, work_dir, s.seed, s.checkpoint_every, deadline=deadline,
                    log_every=s.log_every, batch_size=s.batch_size)
    optimizers = [OptimizerSpec("tiny", ["tiny"], s.lr, s.warmup)]
    if s.adv_weight > 0:
        optimizers.append(OptimizerSpec("critic", ["critic"], s.lr, s.warmup))
    trainer = Trainer(spec, {"tiny": LightPair(tiny), "critic": critic}, optimizers, progress=progress)
    scale = float(teacher_vae.config.scaling_factor)

    def step(c: StepContext) -> None:
        z = c.shard(draw(c.generator))
        with torch.no_grad(), autocast(dev):
            target = teacher_vae.decode(z / scale).sample.float().clamp(-1, 1)
        with autocast(dev):
            image, latent = (out.float() for out in c.models["tiny"](z, target))
        rec = F.l1_loss(image, target) + s.l2_weight * F.mse_loss(image, target)
        enc = F.mse_loss(latent, z)
        adversarial = s.adv_weight > 0 and c.step >= s.adv_start
        loss = rec + s.encoder_weight * enc
        if adversarial:
            loss = loss - s.adv_weight * c.models["critic"](image).mean()
        c.update("tiny", loss)
        if s.adv_weight > 0:
            critic_loss = (F.relu(1 - c.models["critic"](target)).mean()
                           + F.relu(1 + c.models["critic"](image.detach())).mean())
            c.update("critic", critic_loss)
            c.metrics["critic"] = critic_loss.detach()
        c.metrics.update(loss=loss.detach(), reconstruction=rec.detach(), encoder=enc.detach())

    return LightDecoderRun(trainer, step, draw, tiny)

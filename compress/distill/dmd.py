"""Distribution matching distillation with a GAN term (DMD2, Yin et al. 2024): a one-step generator.

Three U-Nets: the generator (initialised from the input Bundle's U-Net: the teacher or any student),
the frozen real score (the recipe's teacher, classifier-free guided at `guidance`), and the fake
score (initialised from the teacher, trained online to denoise the generator's samples). The
generator's sample x is noised to a timestep t; the difference of the two scores' x0 predictions
there, divided by the mean |x − real x0| of each sample, is the gradient DMD gives x (no regression
loss). A GAN head on the fake score's bottleneck (`critic.py`) learns real training latents from
generator samples, both noised to a random timestep, and the generator also gets the
non-saturating GAN loss, weighted `gan_weight`. Two time scales: each training step makes
`critic_updates` updates of the critic (fake score and head: denoising plus classification loss)
on fresh generator samples, then one generator update. bf16 autocast on CUDA throughout.

Sampling convention: the generator is an LCM-style consistency function, x = c_skip(t)·x_t +
c_out(t)·x0(x_t, t), on the timesteps diffusers' `LCMScheduler` takes for `sample_steps` steps (one
step: t = T − 1 from pure noise, where c_skip vanishes). With more steps it trains by backward
simulation: the generator runs a random number of its own steps (without gradients, re-noised to
the next grid timestep with fresh noise, as the LCM sampler does) and learns at the step it reached.
So the output Bundle, a plain U-Net with the teacher's guidance baked in (no guidance input, no
CFG pair), an LCM scheduler, its step count and guidance 1 in its manifest, draws the same images in
pocketdiff's sampler and in a stock diffusers `StableDiffusionPipeline` with that scheduler.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torch import nn

from ...bundle import Bundle
from ...errors import ConfigError
from ...guidance import takes_guidance
from ...passes import PassContext, PassResult, register_pass
from ...schedulers import check_steps, make_scheduler
from ...settings import setting
from ...training import LoopSpec, OptimizerSpec, StepContext, Trainer, autocast
from .checks import check_student, check_teacher
from .critic import Bottleneck, GANHead
from .data import load_latent_data
from .progressive import guided_x0_eps
from .schedule import NoiseSchedule, boundary_scalings
from .speed import prepare_for_speed
from .student import copy_unet, fold_guidance, lcm_student


@register_pass
class DMDPass:
    """Distil a U-Net into a 1-step (or few-step) generator by distribution matching with a GAN term."""

    name = "dmd"

    @dataclass
    class Settings:
        iterations: int = setting(2000, min=1, help="generator updates (each after critic_updates critic updates)")
        batch_size: int = setting(256, min=1, help="global batch of every update (split over processes)")
        generator_lr: float = setting(1e-5, min=0.0, min_exclusive=True, help="generator learning rate (AdamW)")
        critic_lr: float = setting(1e-5, min=0.0, min_exclusive=True, help="fake score and GAN head learning rate")
        warmup: int = setting(100, min=0, help="linear warm-up steps, then a constant rate")
        critic_updates: int = setting(5, min=1, help="critic updates per generator update (two time scales; 1: "
                                                     "the ablation without them)")
        gan_weight: float = setting(1e-3, min=0.0, help="weight of the generator's GAN loss (0: no GAN term, no head)")
        critic_gan_weight: float = setting(1e-2, min=0.0, help="weight of the head's classification loss in the "
                                                               "critic's loss")
        guidance: float = setting(4.0, min=1.0, help="guidance scale of the real score (1 = none), baked in")
        sample_steps: int = setting(1, min=1, max=8, help="steps the generator samples in (above 1: backward "
                                                          "simulation)")
        min_t_fraction: float = setting(0.02, min=0.0, max=1.0, help="smallest DMD timestep, a fraction of T")
        max_t_fraction: float = setting(0.98, min=0.0, max=1.0, help="largest DMD timestep, a fraction of T")
        grad_clip: float = setting(10.0, min=0.0, min_exclusive=True, help="gradient norm clip of both updates")
        weight_decay: float = setting(0.01, min=0.0, help="AdamW weight decay of both optimizers")
        ema_decay: float = setting(0.999, min=0.0, max=1.0, help="EMA decay of the generator (the output weights)")
        critic_ema_decay: float = setting(0.999, min=0.0, max=1.0, help="EMA decay of the critic (checkpointed)")
        data_limit: int | None = setting(None, min=1, help="first N training images only (tests)")
        checkpoint_every: int = setting(100, min=1)
        log_every: int = setting(10, min=1, help="steps between JSONL log lines")
        compile: Literal["off", "default", "max-autotune-no-cudagraphs"] = "off"
        teacher_bf16: bool = setting(True, help="on CUDA, hold the frozen teacher in bf16 (no per-call casts)")
        seed: int = setting(0, min=0)

        def __post_init__(self) -> None:
            if self.min_t_fraction >= self.max_t_fraction:
                raise ValueError(f"min_t_fraction {self.min_t_fraction} must be below max_t_fraction "
                                 f"{self.max_t_fraction}")

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        teacher = ctx.teacher
        check_teacher(teacher)
        check_student(bundle, teacher)
        ours, theirs = getattr(bundle.scheduler, "alphas_cumprod", None), teacher.scheduler.alphas_cumprod
        if ours is None or ours.shape != theirs.shape or not torch.allclose(ours, theirs):
            raise ConfigError("the model's noise schedule (alphas_cumprod) is not the teacher's: the generator must "
                              "sample on the teacher's schedule")
        if s.gan_weight > 0 and getattr(teacher.unet, "mid_block", None) is None:
            raise ConfigError("the GAN head reads the fake score's mid block and the teacher's U-Net has none; set "
                              "gan_weight = 0 or give a teacher with a mid block")
        check_steps(s.sample_steps, make_scheduler("lcm", bundle.scheduler.config), "lcm")

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        run = build_dmd(ctx.teacher, bundle, s, ctx.work_dir, ctx.device, ctx.deadline, ctx.progress)
        if not run.trainer.fit(run.step):
            return PassResult(None, {"steps_done": run.trainer.step}, finished=False)
        run.ema.copy_to(run.generator.parameters())
        out = lcm_student(bundle, run.generator.cpu().eval(), s.sample_steps, 1.0)  # guidance baked in
        return PassResult(out, {"steps": s.iterations, "batch_size": s.batch_size, "critic_updates": s.critic_updates,
                                "gan_weight": s.gan_weight, "guidance_baked_in": s.guidance,
                                "guidance_input": False, "sample_steps": s.sample_steps,
                                "timesteps": [int(t) for t in run.grid], "final": _last_log(ctx.work_dir)})


def sampling_grid(config: dict, steps: int) -> torch.Tensor:
    """The timesteps diffusers' LCMScheduler samples `steps` steps on, for a scheduler config."""
    sampler = make_scheduler("lcm", config)
    sampler.set_timesteps(steps)
    return sampler.timesteps.long()


@contextlib.contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Parameters that take no gradient inside the block (the critic while the generator learns through it)."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclass
class DMDRun:
    """A built DMD run: the trainer, its step function, the generator and its EMA, and the sampling grid."""

    trainer: Trainer
    step: Callable[[StepContext], None]
    generator: diffusers.UNet2DConditionModel
    ema: EMAModel
    grid: torch.Tensor


def _generator_init(bundle: Bundle) -> diffusers.UNet2DConditionModel:
    """A trainable copy of the input U-Net; a guidance-conditioned student has its own guidance folded in first."""
    unet = bundle.unet.float()
    if takes_guidance(unet):
        return fold_guidance(unet, float(bundle.manifest.sampling.get("guidance_scale", 1.0)))
    return copy_unet(unet)


def build_dmd(teacher: Bundle, bundle: Bundle, s: DMDPass.Settings, work_dir: Path, dev: torch.device,
              deadline: float | None = None, progress: bool = True) -> DMDRun:
    """Everything a DMD run needs, ready for `trainer.fit(step)`."""
    sched = NoiseSchedule.from_scheduler(teacher.scheduler, dev)
    grid = sampling_grid(bundle.scheduler.config, s.sample_steps).to(dev)
    data = load_latent_data(teacher, work_dir, dev, s.data_limit)
    torch.manual_seed(s.seed)
    generator = _generator_init(bundle).to(dev).requires_grad_(True)
    fake = copy_unet(teacher.unet.float()).to(dev).requires_grad_(True)
    gan = s.gan_weight > 0
    head = GANHead.for_unet(fake).to(dev) if gan else None
    bottleneck = Bottleneck(fake) if gan else None
    real = teacher.unet.to(dev).eval().requires_grad_(False)
    if s.teacher_bf16 and dev.type == "cuda":
        real.to(dtype=torch.bfloat16)
    modules: dict[str, nn.Module] = {"generator": generator, "fake_score": fake} | ({"gan_head": head} if gan else {})
    critic = ["fake_score"] + (["gan_head"] if gan else [])
    ema = EMAModel(generator.parameters(), decay=s.ema_decay, use_ema_warmup=True, power=3 / 4,
                   foreach=dev.type == "cuda")
    critic_ema = EMAModel([p for n in critic for p in modules[n].parameters()], decay=s.critic_ema_decay,
                          use_ema_warmup=True, power=3 / 4, foreach=dev.type == "cuda")
    common = {"warmup": s.warmup, "weight_decay": s.weight_decay, "grad_clip": s.grad_clip, "final_lr_fraction": 1.0}
    spec = LoopSpec("dmd", s.iterations, work_dir, s.seed, s.checkpoint_every, deadline=deadline,
                    log_every=s.log_every, batch_size=s.batch_size)
    trainer = Trainer(spec, modules, [OptimizerSpec("generator", ["generator"], s.generator_lr, **common),
                                      OptimizerSpec("critic", critic, s.critic_lr, **common)],
                      emas={"generator": ema, "critic": critic_ema}, progress=progress)
    call_gen = prepare_for_speed(trainer.wrapped["generator"], s.compile, dev)
    call_real = prepare_for_speed(real, s.compile, dev)
    prepare_for_speed(fake, "off", dev)  # channels-last only: its mid-block hook stays outside any compiled graph
    lo, hi = int(s.min_t_fraction * sched.steps), int(s.max_t_fraction * sched.steps)

    def generate(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One generator step: its consistency-function sample from x at timesteps t."""
        with autocast(dev):
            out = call_gen(x, t, encoder_hidden_states=cond).sample.float()
        c_skip, c_out = boundary_scalings(t)
        return c_skip * x + c_out * sched.x0_eps(out, x, t)[0]

    def draw(c: StepContext, n: int) -> tuple[Any, ...]:
        """A global batch of everything random one update needs, then this process's shard of it."""
        g = c.generator
        real_z0, cond, uncond, _ = data.sample(g, n)
        shape = real_z0.shape
        start = torch.randn(shape, generator=g, device=dev)
        renoise = torch.randn((max(0, len(grid) - 1), *shape), generator=g, device=dev)
        noise = torch.randn(shape, generator=g, device=dev)
        real_noise = torch.randn(shape, generator=g, device=dev)
        t_any = torch.randint(sched.steps, (2, n), generator=g, device=dev)
        t_dmd = torch.randint(lo, hi + 1, (n,), generator=g, device=dev)
        reached = int(torch.randint(len(grid), (1,), generator=g, device=dev))  # one for the batch, as DMD2 does
        sharded = [c.shard(v) for v in (real_z0, cond, uncond, start, noise, real_noise, t_any[0], t_any[1], t_dmd)]
        return (*sharded, c.shard(renoise.transpose(0, 1)).transpose(0, 1), reached)

    def simulate(start: torch.Tensor, renoise: torch.Tensor, reached: int, cond: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's input at its step `reached` of a run from pure noise (backward simulation)."""
        x = start
        t = grid[:1].expand(len(x))
        with torch.no_grad():
            for i in range(reached):
                t_next = grid[i + 1].expand(len(x))
                x = sched.add_noise(generate(x, t, cond), renoise[i], t_next)
                t = t_next
        return x, t

    def critic_update(c: StepContext) -> None:
        real_z0, cond, _, start, noise, real_noise, t_fake, t_real, _, renoise, reached = draw(c, s.batch_size)
        with torch.no_grad():
            x = generate(*simulate(start, renoise, reached, cond), cond)
        x_t = sched.add_noise(x, noise, t_fake)
        b = len(x)
        if gan:  # one call for both: the fake half's output is denoised, both halves' bottlenecks are judged
            x_t, ts, cond = torch.cat([x_t, sched.add_noise(real_z0, real_noise, t_real)]), torch.cat(
                [t_fake, t_real]), torch.cat([cond, cond])
        else:
            ts = t_fake
        with autocast(dev):
            out = c.models["fake_score"](x_t, ts, encoder_hidden_states=cond).sample.float()
            logits = c.models["gan_head"](bottleneck.take()).float() if gan else None
        target = sched.output_from(x, noise, x_t[:b], t_fake)
        denoise = ((out[:b] - target) ** 2).mean()
        loss = denoise
        if gan:
            judged = F.softplus(logits[:b]).mean() + F.softplus(-logits[b:]).mean()
            loss = loss + s.critic_gan_weight * judged
            c.metrics.update(critic_gan=judged.detach(), real_prob=torch.sigmoid(logits[b:]).mean().detach(),
                             fake_prob=torch.sigmoid(logits[:b]).mean().detach())
        c.update("critic", loss)
        c.metrics.update(critic=loss.detach(), denoise=denoise.detach())

    def generator_update(c: StepContext) -> None:
        _, cond, uncond, start, noise, _, _, _, t, renoise, reached = draw(c, s.batch_size)
        x_in, t_in = simulate(start, renoise, reached, cond)
        x = generate(x_in, t_in, cond)
        x_t = sched.add_noise(x, noise, t)
        with torch.no_grad():
            real_x0 = guided_x0_eps(call_real, sched, x_t, t, cond, uncond,
                                    torch.full((len(x),), s.guidance, device=dev), dev)[0]
        with frozen(fake, head):  # gradients reach the sample through the critic, never the critic's weights
            with autocast(dev), torch.set_grad_enabled(gan):
                out = fake(x_t if gan else x_t.detach(), t, encoder_hidden_states=cond).sample.float()
                logits = head(bottleneck.take()).float() if gan else None
        fake_x0 = sched.x0_eps(out.detach(), x_t.detach(), t)[0]
        del out  # frees the fake score's decoder activations before the generator's backward
        p_real, p_fake = x.detach() - real_x0, x.detach() - fake_x0
        grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True))
        dm = 0.5 * F.mse_loss(x, (x - grad).detach())
        loss = dm
        if gan:
            fooled = F.softplus(-logits).mean()
            loss = loss + s.gan_weight * fooled
            c.metrics["generator_gan"] = fooled.detach()
        c.update("generator", loss)
        c.metrics.update(loss=loss.detach(), dm=dm.detach())

    def step(c: StepContext) -> None:
        for _ in range(s.critic_updates):
            critic_update(c)
        generator_update(c)

    return DMDRun(trainer, step, generator, ema, grid)


def _last_log(work: Path) -> dict[str, float]:
    """The last logged losses of the run (the log line of its final step)."""
    log = work / "dmd_log.jsonl"
    lines = log.read_text().strip().splitlines() if log.is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    return {k: v for k, v in last.items() if k not in ("step", "lr", "elapsed_s", "samples_per_s")}

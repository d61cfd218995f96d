"""Guided progressive distillation (Meng et al. 2023, on Salimans & Ho 2022), as two recipe passes.

`guided-distill` (stage 1) folds classifier-free guidance into a student that takes the guidance
scale w as an input: at any timestep, one student call matches the teacher's guided prediction
(two calls). `progressive` (stage 2, one recipe stage per halving round) takes a guidance-conditioned
model that samples in 2N DDIM steps and trains a copy of it to sample in N: one student step from
t must land where two of the input model's steps land. The input model is this round's teacher, so
a recipe chains rounds 16 → 8 → 4 → 2 → 1, each resumable and cached like any stage.

Both train in x-space with the truncated-SNR weight max(SNR_t, 1) (Salimans & Ho) and sample with
DDIM on the "trailing" grid (timesteps T−1, T−1−T/N, ...), the grid diffusers' DDIMScheduler
uses with `timestep_spacing="trailing"`, so the sampler runs exactly the steps the student learnt.
"""

from __future__ import annotations

from dataclasses import dataclass

import diffusers
import torch
from diffusers.training_utils import EMAModel

from ...bundle import Bundle
from ...errors import ConfigError
from ...guidance import guidance_embedding, takes_guidance
from ...passes import PassContext, PassResult, register_pass
from ...settings import setting
from ...training import LoopSpec, OptimizerSpec, StepContext, Trainer, autocast
from .checks import check_student, check_teacher
from .data import load_latent_data
from .schedule import NoiseSchedule
from .student import copy_unet, with_guidance_input


@dataclass
class DistillSettings:
    """Settings both stages share."""

    iterations: int = setting(1000, min=1, help="training steps")
    batch_size: int = setting(256, min=1, help="global batch (split over processes)")
    lr: float = setting(1e-4, min=0.0, min_exclusive=True)
    warmup: int = setting(100, min=0)
    guidance_min: float = setting(2.0, min=1.0, help="smallest sampled guidance scale w (1 = none)")
    guidance_max: float = setting(6.0, min=1.0, help="largest sampled guidance scale w")
    guidance: float = setting(4.0, min=1.0, help="guidance the Bundle is sampled with (embedded)")
    ema_decay: float = setting(0.999, min=0.0, max=1.0)
    data_limit: int | None = setting(None, min=1, help="first N training images only (tests)")
    checkpoint_every: int = setting(500, min=1)
    log_every: int = setting(50, min=1)
    seed: int = setting(0, min=0)

    def __post_init__(self) -> None:
        if self.guidance_min > self.guidance_max:
            raise ValueError(f"guidance_min {self.guidance_min} exceeds guidance_max {self.guidance_max}")


def trailing_ddim(config: dict, steps: int) -> diffusers.DDIMScheduler:
    """The DDIM sampler on the trailing grid at `steps` steps (what a progressive student samples with)."""
    sched = diffusers.DDIMScheduler.from_config(config, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    return sched


def _alpha_sigma(sched: NoiseSchedule, t: torch.Tensor, final: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) at timesteps t, where t < 0 means past the last step (DDIM's final alpha_bar)."""
    bar = torch.where(t >= 0, sched.alpha[t.clamp(min=0)] ** 2, torch.full_like(t, final, dtype=torch.float32))
    return bar.sqrt().view(-1, 1, 1, 1), (1 - bar).sqrt().view(-1, 1, 1, 1)


def two_step_target(predict, sched: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, stride: int,
                    final: float) -> torch.Tensor:
    """The x0 for which one DDIM step of `stride` from x_t lands where two half steps of `predict`
    ((x, t) -> (x0, eps), the teacher) land: the regression target of step distillation."""
    t_mid, t_end = t - stride // 2, t - stride
    a_m, s_m = _alpha_sigma(sched, t_mid, final)
    x0, eps = predict(x_t, t)
    x_mid = a_m * x0 + s_m * eps
    a_e, s_e = _alpha_sigma(sched, t_end, final)
    x0, eps = predict(x_mid, t_mid.clamp(min=0))
    x_end = a_e * x0 + s_e * eps
    a_t, s_t = sched.at(t)
    ratio = s_e / s_t
    return (x_end - ratio * x_t) / (a_e - ratio * a_t)


def _train(name: str, student: diffusers.UNet2DConditionModel, data, sched, s: DistillSettings, ctx: PassContext,
           target_fn) -> tuple[Trainer, bool, EMAModel]:
    """The shared loop: sample (z0, caption, w, t), ask `target_fn` for the x0 target, regress the student."""
    dev = ctx.device
    ema = EMAModel(student.parameters(), decay=s.ema_decay, use_ema_warmup=True, power=3 / 4,
                   foreach=dev.type == "cuda")
    spec = LoopSpec(name, s.iterations, ctx.work_dir, s.seed, s.checkpoint_every, deadline=ctx.deadline,
                    log_every=s.log_every, batch_size=s.batch_size)
    trainer = Trainer(spec, {"student": student}, [OptimizerSpec("student", ["student"], s.lr, s.warmup)],
                      emas={"student": ema}, progress=ctx.progress)
    dim = student.config.time_cond_proj_dim
    span = s.guidance_max - s.guidance_min

    def step(c: StepContext) -> None:
        g = c.generator
        z0, cond, uncond, _ = data.sample(g, s.batch_size)
        noise = torch.randn(z0.shape, generator=g, device=dev)
        w = s.guidance_min + span * torch.rand(s.batch_size, generator=g, device=dev)
        u = torch.rand(s.batch_size, generator=g, device=dev)
        z0, cond, uncond, noise, w, u = map(c.shard, (z0, cond, uncond, noise, w, u))
        t, x_t, x0_target = target_fn(z0, noise, cond, uncond, w, u)
        with autocast(dev):
            out = c.models["student"](x_t, t, encoder_hidden_states=cond,
                                      timestep_cond=guidance_embedding(w - 1.0, dim)).sample.float()
        x0 = sched.x0_eps(out, x_t, t)[0]
        loss = (sched.truncated_snr_weight(t) * ((x0 - x0_target) ** 2).mean(dim=(1, 2, 3))).mean()
        c.update("student", loss)
        c.metrics["loss"] = loss.detach()

    finished = trainer.fit(step)
    return trainer, finished, ema


def guided_x0_eps(unet: torch.nn.Module, sched: NoiseSchedule, x_t, t, cond, uncond, w, dev) -> tuple:
    """(x0, eps) of the classifier-free guided prediction of a plain U-Net (two calls in one batch); the
    caller decides whether gradients flow (a frozen teacher under no_grad, a CFG-aware student not)."""
    with autocast(dev):
        both = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([cond, uncond])).sample
    x0_c, eps_c = sched.x0_eps(both[:len(t)].float(), x_t, t)
    x0_u, eps_u = sched.x0_eps(both[len(t):].float(), x_t, t)
    wv = w.view(-1, 1, 1, 1)
    return x0_u + wv * (x0_c - x0_u), eps_u + wv * (eps_c - eps_u)


@register_pass
class GuidedDistillPass:
    """Stage 1: a student with a guidance input matches the teacher's guided prediction in one call."""

    name = "guided-distill"

    @dataclass
    class Settings(DistillSettings):
        sample_steps: int = setting(16, min=1, max=1000, help="DDIM steps (trailing grid) it is sampled with")

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        check_teacher(ctx.teacher)
        check_student(bundle, ctx.teacher)

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        dev, teacher = ctx.device, ctx.teacher
        sched = NoiseSchedule.from_scheduler(teacher.scheduler, dev)
        data = load_latent_data(teacher, ctx.work_dir, dev, s.data_limit)
        teacher_unet = teacher.unet.to(dev).eval().requires_grad_(False)
        student = with_guidance_input(bundle.unet.float()).to(dev).requires_grad_(True)

        def target(z0, noise, cond, uncond, w, u):
            t = (u * sched.steps).long().clamp(max=sched.steps - 1)
            x_t = sched.add_noise(z0, noise, t)
            with torch.no_grad():
                return t, x_t, guided_x0_eps(teacher_unet, sched, x_t, t, cond, uncond, w, dev)[0]

        trainer, finished, ema = _train("guided-distill", student, data, sched, s, ctx, target)
        if not finished:
            return PassResult(None, {"steps_done": trainer.step}, finished=False)
        ema.copy_to(student.parameters())
        return PassResult(ddim_student(bundle, student, s.sample_steps, s.guidance),
                          {"steps": s.iterations, "batch_size": s.batch_size})


@register_pass
class ProgressivePass:
    """Stage 2, one round: a copy of a 2N-step guidance-conditioned model learns to sample in N steps."""

    name = "progressive"

    @dataclass
    class Settings(DistillSettings):
        pass

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        if not takes_guidance(bundle.unet):
            raise ConfigError("progressive needs a guidance-conditioned model (run guided-distill first)")
        steps = bundle.manifest.sampling.get("steps")
        if not isinstance(steps, int) or steps < 2 or steps % 2:
            raise ConfigError(f"progressive halves the input model's step count, which must be even and >= 2 "
                              f"(it samples in {steps})")

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        dev = ctx.device
        data = load_latent_data(ctx.teacher, ctx.work_dir, dev, s.data_limit)
        sched = NoiseSchedule.from_scheduler(bundle.scheduler, dev)
        teacher_steps = bundle.manifest.sampling["steps"]
        steps = teacher_steps // 2
        grid = trailing_ddim(bundle.scheduler.config, steps)
        final = float(grid.final_alpha_cumprod)
        starts = grid.timesteps.to(dev)
        stride = sched.steps // steps
        round_teacher = bundle.unet.float().to(dev).eval().requires_grad_(False)
        student = copy_unet(round_teacher).requires_grad_(True)
        dim = student.config.time_cond_proj_dim

        def teacher_x0(x, t, cond, w):
            with torch.no_grad(), autocast(dev):
                out = round_teacher(x, t, encoder_hidden_states=cond,
                                    timestep_cond=guidance_embedding(w - 1.0, dim)).sample.float()
            return sched.x0_eps(out, x, t)

        def target(z0, noise, cond, uncond, w, u):
            t = starts[(u * steps).long().clamp(max=steps - 1)]
            x_t = sched.add_noise(z0, noise, t)
            return t, x_t, two_step_target(lambda x, tt: teacher_x0(x, tt, cond, w), sched, x_t, t, stride, final)

        trainer, finished, ema = _train("progressive", student, data, sched, s, ctx, target)
        if not finished:
            return PassResult(None, {"steps_done": trainer.step}, finished=False)
        ema.copy_to(student.parameters())
        return PassResult(ddim_student(bundle, student, steps, s.guidance),
                          {"steps": s.iterations, "batch_size": s.batch_size, "from_steps": teacher_steps,
                           "to_steps": steps})


def ddim_student(bundle: Bundle, unet: diffusers.UNet2DConditionModel, steps: int, guidance: float) -> Bundle:
    """The Bundle with the student, DDIM on the trailing grid, and its step count and guidance."""
    bundle.unet = unet.cpu().eval().requires_grad_(False)
    bundle.scheduler = diffusers.DDIMScheduler.from_config(bundle.scheduler.config, timestep_spacing="trailing")
    bundle.manifest.sampling = {"scheduler": "ddim", "steps": steps, "guidance_scale": guidance}
    return bundle

"""CFG-aware step distillation (SnapFusion, Li et al. 2023): a student that samples in N DDIM steps
with classifier-free guidance as usual (two calls a step, negative prompts kept), trained from a
teacher at 2N steps.

Each step is one of two losses: with probability `cfg_probability` the CFG loss — guidance w drawn
from a range, applied to the teacher's two DDIM steps and to the student's own conditional and
unconditional predictions — else the vanilla loss on conditional predictions alone. Both regress
the student's x0 onto the two-teacher-step target in x-space with the max(SNR, 1) weight; vanilla
steps add `denoising_weight` times the ordinary noise-prediction loss. The student starts from the
input Bundle's U-Net. The target comes from the recipe's teacher (its 2N-step DDIM ODE) or, with
`round_teacher = "input"`, from the input model's own 2N-step sampling: SnapFusion's progressive
rounds (16 -> 8 -> 4 -> 2), each a resumable recipe stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.training_utils import EMAModel

from ...bundle import Bundle
from ...errors import ConfigError
from ...guidance import takes_guidance
from ...passes import PassContext, PassResult, register_pass
from ...settings import setting
from ...training import LoopSpec, OptimizerSpec, StepContext, Trainer, autocast
from .checks import check_student, check_teacher
from .data import load_latent_data
from .progressive import DistillSettings, ddim_student, guided_x0_eps, trailing_ddim, two_step_target
from .schedule import NoiseSchedule
from .student import copy_unet


@register_pass
class CFGAwarePass:
    """Distil the teacher into an N-step DDIM student that keeps ordinary CFG (SnapFusion)."""

    name = "cfg-aware"

    @dataclass
    class Settings(DistillSettings):
        sample_steps: int = setting(8, min=1, max=500, help="DDIM steps (trailing grid) of the student")
        cfg_probability: float = setting(0.1, min=0.0, max=1.0, help="share of steps on the CFG loss")
        denoising_weight: float = setting(1.0, min=0.0, help="weight of the plain noise-prediction loss")
        round_teacher: Literal["teacher", "input"] = setting(
            "teacher", help="whose 2N-step DDIM gives the target: the recipe's teacher, or the input model (a round)")

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        check_teacher(ctx.teacher)
        check_student(bundle, ctx.teacher)
        if takes_guidance(bundle.unet):
            raise ConfigError("cfg-aware trains a student that runs ordinary CFG; give a U-Net without a guidance "
                              "input (not an lcm or guided-distill student)")
        if s.round_teacher == "input":
            steps = bundle.manifest.sampling.get("steps")
            if steps != 2 * s.sample_steps:
                raise ConfigError(f"a cfg-aware round from the input model halves its step count: the input samples "
                                  f"in {steps} steps, so sample_steps must be {steps // 2 if isinstance(steps, int) else '-'}"
                                  f" (it is {s.sample_steps})")

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        dev, teacher = ctx.device, ctx.teacher
        sched = NoiseSchedule.from_scheduler(teacher.scheduler, dev)
        data = load_latent_data(teacher, ctx.work_dir, dev, s.data_limit)
        grid = trailing_ddim(teacher.scheduler.config, s.sample_steps)
        starts, final = grid.timesteps.to(dev), float(grid.final_alpha_cumprod)
        stride = sched.steps // s.sample_steps
        source = teacher.unet if s.round_teacher == "teacher" else bundle.unet
        teacher_unet = source.float().to(dev).eval().requires_grad_(False)
        student = copy_unet(bundle.unet.float()).to(dev).requires_grad_(True)
        ema = EMAModel(student.parameters(), decay=s.ema_decay, use_ema_warmup=True, power=3 / 4,
                       foreach=dev.type == "cuda")
        spec = LoopSpec("cfg-aware", s.iterations, ctx.work_dir, s.seed, s.checkpoint_every, deadline=ctx.deadline,
                        log_every=s.log_every, batch_size=s.batch_size)
        trainer = Trainer(spec, {"student": student}, [OptimizerSpec("student", ["student"], s.lr, s.warmup)],
                          emas={"student": ema}, progress=ctx.progress)
        span = s.guidance_max - s.guidance_min

        def predict(unet, x, t, cond, uncond, w):
            """(x0, eps) of `unet`, guided with w when w is given (conditional only otherwise)."""
            if w is not None:
                return guided_x0_eps(unet, sched, x, t, cond, uncond, w, dev)
            with autocast(dev):
                out = unet(x, t, encoder_hidden_states=cond).sample.float()
            return sched.x0_eps(out, x, t)

        def step(c: StepContext) -> None:
            g = c.generator
            z0, cond, uncond, _ = data.sample(g, s.batch_size)
            noise = torch.randn(z0.shape, generator=g, device=dev)
            w = s.guidance_min + span * torch.rand(s.batch_size, generator=g, device=dev)
            index = torch.randint(s.sample_steps, (s.batch_size,), generator=g, device=dev)
            use_cfg = bool(torch.rand(1, generator=g, device=dev) < s.cfg_probability)
            z0, cond, uncond, noise, w, index = map(c.shard, (z0, cond, uncond, noise, w, index))
            t = starts[index]
            x_t = sched.add_noise(z0, noise, t)
            guide = w if use_cfg else None
            with torch.no_grad():
                target = two_step_target(lambda x, tt: predict(teacher_unet, x, tt, cond, uncond, guide),
                                         sched, x_t, t, stride, final)
            x0, eps = predict(c.models["student"], x_t, t, cond, uncond, guide)
            distil = (sched.truncated_snr_weight(t) * ((x0 - target) ** 2).mean(dim=(1, 2, 3))).mean()
            loss = distil if use_cfg else distil + s.denoising_weight * ((eps - noise) ** 2).mean()
            c.update("student", loss)
            c.metrics.update(loss=loss.detach(), distil=distil.detach(), cfg=float(use_cfg))

        if not trainer.fit(step):
            return PassResult(None, {"steps_done": trainer.step}, finished=False)
        ema.copy_to(student.parameters())
        bundle = ddim_student(bundle, student, s.sample_steps, s.guidance)
        return PassResult(bundle, {"steps": s.iterations, "batch_size": s.batch_size, "sample_steps": s.sample_steps,
                                   "cfg_probability": s.cfg_probability, "round_teacher": s.round_teacher})

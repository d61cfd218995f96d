"""Latent consistency distillation (LCM, Luo et al. 2023), with guidance as an embedded input.

Each step: noise a real latent to a grid timestep t_{n+k} of the skipping-step DDIM solver, take
one guided DDIM step of the frozen teacher to t_n (guidance w sampled from a range), and train the
student's consistency function at t_{n+k} to match the EMA target's at t_n (boundary scalings
c_skip / c_out as diffusers' LCMScheduler applies them), under a pseudo-Huber or L2 loss.

Guidance is Imagen-style here: w = 1 is no guidance, the teacher's guided output is
uncond + w·(cond − uncond), and the student embeds w − 1 exactly as diffusers'
`LatentConsistencyModelPipeline` does for `guidance_scale = w` (the diffusers training script
writes the same thing as cond + w'·(cond − uncond) with w' = w − 1: ANCHORS.md's "offset by one").

The output Bundle keeps the guidance input (`time_cond_proj_dim`) and records in its manifest the
LCM scheduler, the step count and the guidance scale, which pocketdiff's sampler and diffusers'
LCM pipeline both embed instead of running CFG; the `fold-guidance` pass bakes one guidance into
a plain U-Net of the teacher's config for export. `lora_rank` trains LoRA adapters
(peft, through diffusers' adapter API) instead of the whole U-Net and fuses them at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import diffusers
import torch
from diffusers.training_utils import EMAModel

from ...bundle import Bundle
from ...errors import ConfigError
from ...guidance import guidance_embedding
from ...passes import PassContext, PassResult, register_pass
from ...settings import setting
from ...training import LoopSpec, OptimizerSpec, StepContext, Trainer, autocast
from .checks import check_student, check_teacher
from .data import load_latent_data
from .schedule import DDIMSolver, NoiseSchedule, boundary_scalings, pseudo_huber
from .speed import prepare_for_speed
from .student import copy_unet, ema_update, lcm_student, with_guidance_input


@register_pass
class LatentConsistencyPass:
    """Distil the teacher into a few-step latent consistency model with a guidance input."""

    name = "lcm"

    @dataclass
    class Settings:
        iterations: int = setting(2000, min=1, help="training steps")
        batch_size: int = setting(256, min=1, help="global batch (split over processes)")
        lr: float = setting(1e-4, min=0.0, min_exclusive=True, help="peak learning rate (AdamW)")
        warmup: int = setting(100, min=0, help="linear warm-up steps")
        guidance_min: float = setting(2.0, min=1.0, help="smallest sampled guidance scale w (1 = none)")
        guidance_max: float = setting(6.0, min=1.0, help="largest sampled guidance scale w")
        guidance: float = setting(4.0, min=1.0, help="guidance the Bundle is sampled with (embedded)")
        sample_steps: int = setting(4, min=1, max=50, help="steps the student is sampled with")
        ddim_timesteps: int = setting(50, min=1, help="solver grid over the teacher's training steps")
        loss: Literal["huber", "l2"] = "huber"
        huber_c: float = setting(0.001, min=0.0, min_exclusive=True, help="pseudo-Huber constant")
        target_decay: float = setting(0.95, min=0.0, max=1.0, help="EMA decay of the target network")
        ema_decay: float = setting(0.999, min=0.0, max=1.0, help="EMA decay of the output weights")
        lora_rank: int | None = setting(None, min=1, help="train LoRA adapters of this rank instead")
        data_limit: int | None = setting(None, min=1, help="first N training images only (tests)")
        checkpoint_every: int = setting(500, min=1)
        log_every: int = setting(50, min=1, help="steps between JSONL log lines")
        compile: Literal["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "off"
        teacher_bf16: bool = setting(True, help="on CUDA, hold the frozen teacher in bf16 (no per-call casts)")
        seed: int = setting(0, min=0)

        def __post_init__(self) -> None:
            if self.guidance_min > self.guidance_max:
                raise ValueError(f"guidance_min {self.guidance_min} exceeds guidance_max {self.guidance_max}")
            if self.sample_steps > self.ddim_timesteps:
                raise ValueError(f"sample_steps {self.sample_steps} exceeds the solver's {self.ddim_timesteps} "
                                 "timesteps: LCM can only sample on its own grid")

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        check_teacher(ctx.teacher)
        check_student(bundle, ctx.teacher)
        DDIMSolver.build(ctx.teacher.scheduler.config.num_train_timesteps, s.ddim_timesteps)
        if s.lora_rank is not None:
            _require_peft()

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        run = build_lcm(ctx.teacher, bundle, s, ctx.work_dir, ctx.device, ctx.deadline, ctx.progress)
        if not run.trainer.fit(run.step):
            return PassResult(None, {"steps_done": run.trainer.step}, finished=False)
        run.ema.copy_to(run.trained)
        student = _fuse_lora(run.student) if s.lora_rank is not None else run.student
        return PassResult(lcm_student(bundle, student.cpu().eval(), s.sample_steps, s.guidance, s.ddim_timesteps),
                          {"steps": s.iterations, "batch_size": s.batch_size, "final_loss": _last_loss(ctx.work_dir),
                           "guidance_range": [s.guidance_min, s.guidance_max], "lora_rank": s.lora_rank})


@dataclass
class LCMRun:
    """A built LCM training run: the trainer, its step function, and the modules the output needs."""

    trainer: Trainer
    step: Callable[[StepContext], None]
    student: diffusers.UNet2DConditionModel
    ema: EMAModel
    trained: list[torch.nn.Parameter]


def build_lcm(teacher: Bundle, bundle: Bundle, s: LatentConsistencyPass.Settings, work_dir: Path,
              dev: torch.device, deadline: float | None = None, progress: bool = True) -> LCMRun:
    """Everything an LCM run needs, ready for `trainer.fit(step)` (the pass) or timed steps (the bench)."""
    sched = NoiseSchedule.from_scheduler(teacher.scheduler, dev)
    solver = DDIMSolver.build(sched.steps, s.ddim_timesteps, dev)
    data = load_latent_data(teacher, work_dir, dev, s.data_limit)
    teacher_unet = teacher.unet.to(dev).eval().requires_grad_(False)
    if s.teacher_bf16 and dev.type == "cuda":
        teacher_unet.to(dtype=torch.bfloat16)
    torch.manual_seed(s.seed)
    student = with_guidance_input(bundle.unet.float()).to(dev)
    if s.lora_rank is not None:
        _add_lora(student, s.lora_rank)
    else:
        student.requires_grad_(True)
    # LoRA trains with the online student as its own target (as LCM-LoRA does); full LCM keeps an EMA target.
    target = None if s.lora_rank is not None else copy_unet(student).requires_grad_(False)
    trained = [p for p in student.parameters() if p.requires_grad]
    ema = EMAModel(trained, decay=s.ema_decay, use_ema_warmup=True, power=3 / 4, foreach=dev.type == "cuda")
    spec = LoopSpec("lcm", s.iterations, work_dir, s.seed, s.checkpoint_every, deadline=deadline,
                    log_every=s.log_every, batch_size=s.batch_size)
    modules = {"student": student} | ({"target": target} if target is not None else {})
    trainer = Trainer(spec, modules, [OptimizerSpec("student", ["student"], s.lr, s.warmup)],
                      emas={"student": ema}, progress=progress)
    call_student = prepare_for_speed(trainer.wrapped["student"], s.compile, dev)
    call_teacher = prepare_for_speed(teacher_unet, s.compile, dev)
    call_target = call_student if target is None else prepare_for_speed(target, s.compile, dev)
    dim = student.config.time_cond_proj_dim
    span = s.guidance_max - s.guidance_min

    def step(c: StepContext) -> None:  # one LCM step on this process's shard of the global batch
        if s.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        g = c.generator
        z0, cond, uncond, _ = data.sample(g, s.batch_size)
        index = torch.randint(len(solver.timesteps), (s.batch_size,), generator=g, device=dev)
        noise = torch.randn(z0.shape, generator=g, device=dev)
        w = s.guidance_min + span * torch.rand(s.batch_size, generator=g, device=dev)
        z0, cond, uncond, index, noise, w = map(c.shard, (z0, cond, uncond, index, noise, w))
        t = solver.timesteps[index]
        t_prev = (t - solver.skip).clamp(min=0)
        x_t = sched.add_noise(z0, noise, t)
        w_emb = guidance_embedding(w - 1.0, dim)
        with autocast(dev):
            out = call_student(x_t, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample.float()
        c_skip, c_out = boundary_scalings(t)
        pred = c_skip * x_t + c_out * sched.x0_eps(out, x_t, t)[0]
        with torch.no_grad():
            with autocast(dev):
                both = call_teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                    encoder_hidden_states=torch.cat([cond, uncond])).sample.float()
            x0_c, eps_c = sched.x0_eps(both[:len(t)], x_t, t)
            x0_u, eps_u = sched.x0_eps(both[len(t):], x_t, t)
            wv = w.view(-1, 1, 1, 1)
            x_prev = sched.ddim_step(x0_u + wv * (x0_c - x0_u), eps_u + wv * (eps_c - eps_u), t_prev)
            with autocast(dev):
                out_t = call_target(x_prev, t_prev, encoder_hidden_states=cond, timestep_cond=w_emb).sample.float()
            c_skip_p, c_out_p = boundary_scalings(t_prev)
            tgt = c_skip_p * x_prev + c_out_p * sched.x0_eps(out_t, x_prev, t_prev)[0]
        per = pseudo_huber(pred, tgt, s.huber_c) if s.loss == "huber" else ((pred - tgt) ** 2).mean(dim=(1, 2, 3))
        loss = per.mean()
        c.update("student", loss)
        if target is not None:
            ema_update(target, student, s.target_decay)
        c.metrics["loss"] = loss.detach()

    return LCMRun(trainer, step, student, ema, trained)


def _last_loss(work: Path) -> float | None:
    log = work / "lcm_log.jsonl"
    lines = log.read_text().strip().splitlines() if log.is_file() else []
    return json.loads(lines[-1]).get("loss") if lines else None


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("lora_rank needs peft (pip install peft==0.21.2)") from None


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def _add_lora(unet: diffusers.UNet2DConditionModel, rank: int) -> None:
    """LoRA adapters on the attention, feed-forward and resnet layers; only they and the guidance input train."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    unet.time_embedding.cond_proj.requires_grad_(True)


def _fuse_lora(unet: diffusers.UNet2DConditionModel) -> diffusers.UNet2DConditionModel:
    """The adapters merged into the base weights: a plain U-Net with no LoRA layers left."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet

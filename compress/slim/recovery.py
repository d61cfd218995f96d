"""Recovery after slimming: output- and feature-level distillation from the teacher plus the denoising loss.

BK-SDM's objective (Kim et al. 2023): L = w_d·L_denoise + w_o·||ε_S − ε_T||² + w_f·Σ_blocks ||f_S − f_T||²,
weights 1/1/1. Features are every down block's output before its downsampler and every up block's
output. Blocks pair from the outside in (down stage s with the teacher's s, up stages counted from
the outermost), so a student that lost its innermost stage still pairs every stage it kept; a 1×1
adapter, trained with the student and dropped afterwards, maps a student feature whose width differs
(a pruned or redesigned student) to the teacher's. Feature taps resolve blocks on the unwrapped
model, so names written with DDP's `module.` prefix find the same blocks (BK-SDM's multi-GPU
KeyError). Works after any slimming pass whose U-Net keeps the teacher's inputs and outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from torch import nn

from ...bundle import Bundle
from ...passes import PassContext, PassResult, register_pass
from ...settings import setting
from ...training import LoopSpec, OptimizerSpec, StepContext, Trainer, autocast
from ..distill.checks import check_student, check_teacher
from ..distill.data import LatentData, load_latent_data
from ..distill.schedule import NoiseSchedule


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or any `.module`) wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class FeatureTaps:
    """Forward hooks that keep named blocks' features on each call; names may carry DDP's `module.` prefix."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        blocks = dict(unwrap(model).named_modules())
        self.names = [n.removeprefix("module.") for n in names]
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [blocks[n].register_forward_hook(self._keeper(n)) for n in self.names]

    def _keeper(self, name: str) -> Callable:
        def keep(module: nn.Module, args: tuple, output: object) -> None:
            self.features[name] = block_feature(module, output)
        return keep

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()


def block_feature(block: nn.Module, output: object) -> torch.Tensor:
    """A down block's last feature before its downsampler, or an up block's output."""
    if isinstance(output, tuple):  # down block: (hidden, residual states ending with the downsampler's)
        residuals = output[1]
        return residuals[-2] if getattr(block, "downsamplers", None) is not None else output[0]
    return output


def paired_blocks(student: diffusers.UNet2DConditionModel, teacher: diffusers.UNet2DConditionModel
                  ) -> list[tuple[str, str]]:
    """(student block, teacher block) names, paired from the outermost stage inwards."""
    s_down, t_down = len(student.down_blocks), len(teacher.down_blocks)
    pairs = [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(min(s_down, t_down))]
    s_up, t_up = len(student.up_blocks), len(teacher.up_blocks)
    pairs += [(f"up_blocks.{s_up - k}", f"up_blocks.{t_up - k}") for k in range(min(s_up, t_up), 0, -1)]
    return pairs


def feature_widths(unet: diffusers.UNet2DConditionModel, names: list[str], sample: dict) -> dict[str, int]:
    """Channels of each named block's feature, from one call on `sample`."""
    taps = FeatureTaps(unet, names)
    with torch.no_grad():
        unet(**sample)
    taps.remove()
    return {n: f.shape[1] for n, f in taps.features.items()}


@dataclass
class RecoveryLosses:
    """One batch's terms (each already weighted into `total`)."""

    total: torch.Tensor
    denoise: torch.Tensor
    output: torch.Tensor
    feature: torch.Tensor


class Recovery(nn.Module):
    """The student and its feature adapters as one trainable module (what DDP wraps)."""

    def __init__(self, student: diffusers.UNet2DConditionModel, adapters: nn.ModuleDict) -> None:
        super().__init__()
        self.student, self.adapters = student, adapters

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.student(x_t, t, encoder_hidden_states=context).sample


@dataclass
class RecoveryRun:
    """A built recovery run: the trainer, its step, the loss on any batch, and the student it trains."""

    trainer: Trainer
    step: Callable[[StepContext], None]
    losses: Callable[[nn.Module, tuple[torch.Tensor, ...]], RecoveryLosses]
    draw: Callable[[torch.Generator], tuple[torch.Tensor, ...]]
    student: diffusers.UNet2DConditionModel


@register_pass
class RecoveryPass:
    """Train a slimmed U-Net back toward its teacher: denoising + output KD + feature KD (BK-SDM)."""

    name = "recover"

    @dataclass
    class Settings:
        iterations: int = setting(5000, min=1)
        batch_size: int = setting(64, min=1, help="global batch (split over processes)")
        lr: float = setting(5e-5, min=0.0, min_exclusive=True, help="peak learning rate (BK-SDM: 5e-5)")
        warmup: int = setting(100, min=0)
        denoise_weight: float = setting(1.0, min=0.0)
        output_weight: float = setting(1.0, min=0.0)
        feature_weight: float = setting(1.0, min=0.0)
        uncond_prob: float = setting(0.1, min=0.0, max=1.0, help="captions dropped to empty, so CFG still works")
        data_limit: int | None = setting(None, min=1, help="first N training images only (tests)")
        checkpoint_every: int = setting(500, min=1)
        log_every: int = setting(50, min=1)
        seed: int = setting(0, min=0)

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        check_teacher(ctx.teacher)
        check_student(bundle, ctx.teacher)

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        run = build_recovery(ctx.teacher, bundle, s, ctx.work_dir, ctx.device, ctx.deadline, ctx.progress)
        if not run.trainer.fit(run.step):
            return PassResult(None, {"steps_done": run.trainer.step}, finished=False)
        bundle.unet = run.student.cpu().eval().requires_grad_(False)
        return PassResult(bundle, {"steps": s.iterations, "batch_size": s.batch_size,
                                   "weights": [s.denoise_weight, s.output_weight, s.feature_weight]})


def build_recovery(teacher: Bundle, bundle: Bundle, s: RecoveryPass.Settings, work_dir: Path, dev: torch.device,
                   deadline: float | None = None, progress: bool = True) -> RecoveryRun:
    """Everything a recovery run needs, ready for `trainer.fit(step)`."""
    sched = NoiseSchedule.from_scheduler(teacher.scheduler, dev)
    data: LatentData = load_latent_data(teacher, work_dir, dev, s.data_limit)
    teacher_unet = teacher.unet.to(dev).eval().requires_grad_(False)
    student = bundle.unet.float().to(dev).requires_grad_(True)
    pairs = paired_blocks(student, teacher_unet)
    z, cond, _, _ = data.sample(torch.Generator(dev).manual_seed(0), 1)
    probe = {"sample": z, "timestep": torch.tensor([500], device=dev), "encoder_hidden_states": cond}
    s_width = feature_widths(student, [a for a, _ in pairs], probe)
    t_width = feature_widths(teacher_unet, [b for _, b in pairs], probe)
    torch.manual_seed(s.seed)
    adapters = nn.ModuleDict({a.replace(".", "_"): nn.Conv2d(s_width[a], t_width[b], 1)
                              for a, b in pairs if s_width[a] != t_width[b]}).to(dev)
    model = Recovery(student, adapters)
    student_taps = FeatureTaps(model.student, [a for a, _ in pairs])
    teacher_taps = FeatureTaps(teacher_unet, [b for _, b in pairs])
    spec = LoopSpec("recover", s.iterations, work_dir, s.seed, s.checkpoint_every, deadline=deadline,
                    log_every=s.log_every, batch_size=s.batch_size)
    trainer = Trainer(spec, {"recovery": model}, [OptimizerSpec("recovery", ["recovery"], s.lr, s.warmup)],
                      progress=progress)

    def draw(g: torch.Generator) -> tuple[torch.Tensor, ...]:
        z0, cond, uncond, _ = data.sample(g, s.batch_size)
        drop = torch.rand(s.batch_size, generator=g, device=dev) < s.uncond_prob
        context = torch.where(drop.view(-1, 1, 1), uncond, cond)
        t = torch.randint(sched.steps, (s.batch_size,), generator=g, device=dev)
        noise = torch.randn(z0.shape, generator=g, device=dev)
        return z0, context, t, noise

    def losses(call: nn.Module, batch: tuple[torch.Tensor, ...]) -> RecoveryLosses:
        z0, context, t, noise = batch
        x_t = sched.add_noise(z0, noise, t)
        with torch.no_grad(), autocast(dev):
            target_out = teacher_unet(x_t, t, encoder_hidden_states=context).sample.float()
        with autocast(dev):
            out = call(x_t, t, context).float()
        denoise = F.mse_loss(out, sched.output_from(z0, noise, x_t, t))
        output = F.mse_loss(out, target_out)
        feature = out.new_zeros(())
        for a, b in pairs:
            f = student_taps.features[a].float()
            key = a.replace(".", "_")
            if key in adapters:
                f = adapters[key](f)
            want = teacher_taps.features[b].float()
            if f.shape[-2:] != want.shape[-2:]:
                f = F.adaptive_avg_pool2d(f, want.shape[-2:])
            feature = feature + F.mse_loss(f, want)
        total = s.denoise_weight * denoise + s.output_weight * output + s.feature_weight * feature
        return RecoveryLosses(total, denoise.detach(), output.detach(), feature.detach())

    def step(c: StepContext) -> None:
        batch = tuple(c.shard(x) for x in draw(c.generator))
        terms = losses(c.models["recovery"], batch)
        c.update("recovery", terms.total)
        c.metrics.update(loss=terms.total.detach(), denoise=terms.denoise, output_kd=terms.output,
                         feature_kd=terms.feature)

    return RecoveryRun(trainer, step, losses, draw, student)

"""Structured channel pruning (Diff-Pruning, Fang et al. 2023): a narrower U-Net that keeps the teacher's
most important channels, as a plain diffusers `UNet2DConditionModel` with its config rewritten.

Mechanism apart from policy, as Torch-Pruning splits them. Torch-Pruning's dependency graph finds which
channels must shrink together (a stage's skip connections and residual adds, each resnet's inner
channels, each transformer's inner stream, an attention's q/k/v/out, a GEGLU's two halves) and does the
surgery. The policy is Taylor importance |w·g|, g the gradient of the denoising loss accumulated over
calibration batches spread evenly over the training timesteps, drawn from the training latents the
distillation passes use (`compress.distill.data`: Fashion-MNIST through the teacher's VAE, real caption
states).

A diffusers config holds one width per stage (`block_out_channels`), so every coupled group of a stage
is cut to the same fraction: the stage's new width. Widths must keep the config valid: a multiple of
`norm_num_groups` (every GroupNorm divides) and of the stage's head size, since attention is pruned as
whole heads (the stage's head count in `attention_head_dim` shrinks, head size stays). Within a
GroupNorm's groups the kept channels are balanced (each group keeps the same count, so a new group is a
subset of an old one); GroupNorms over an up block's concatenation may regroup channels across its two
parts, which recovery (`recover`) retrains. Stage 0 keeps its width: diffusers ties the sinusoidal
timestep projection's size to `block_out_channels[0]`, and another size is another function, not a subset.
The target is a fraction of U-Net MACs to remove: of the valid stage widths that meet it (MACs counted on
the meta device) the pass takes the most even cut, and refuses a target no valid widths meet. Valid also
means every tensor of the teacher survives: no resnet may gain or lose its shortcut convolution.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ...bundle import Bundle
from ...errors import ConfigError
from ...passes import PassContext, PassResult, register_pass
from ...settings import setting
from ..distill.checks import check_teacher
from ..distill.data import load_latent_data
from ..distill.schedule import NoiseSchedule
from .blocks import count_params


def _clean(config: Any) -> dict[str, Any]:
    """A config as a plain dict without diffusers' private keys."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _heads(config: dict[str, Any]) -> list[int]:
    """Attention heads per stage (diffusers reads the legacy `attention_head_dim` as the head count)."""
    n = len(config["block_out_channels"])
    heads = config.get("num_attention_heads") or config["attention_head_dim"]
    return list(heads) if isinstance(heads, (list, tuple)) else [heads] * n


def _units(config: dict[str, Any]) -> list[int]:
    """The step each stage's width moves in: GroupNorm groups and whole heads stay valid."""
    groups = config["norm_num_groups"]
    units = []
    for s, (c, h) in enumerate(zip(config["block_out_channels"], _heads(config))):
        if c % h:
            raise ConfigError(f"stage {s} has {c} channels and {h} heads: not whole heads, cannot prune by head")
        units.append(math.lcm(groups, c // h))
    return units


def pruned_config(config: Any, widths: list[int]) -> dict[str, Any]:
    """The config with stage widths `widths`, each stage keeping its head size (so fewer, whole heads)."""
    config = _clean(config)
    if config.get("num_attention_heads") is not None:
        raise ConfigError("pruning reads heads from attention_head_dim; this U-Net sets num_attention_heads")
    head_size = [c // h for c, h in zip(config["block_out_channels"], _heads(config))]
    config["block_out_channels"] = list(widths)
    config["attention_head_dim"] = [c // d for c, d in zip(widths, head_size)]
    return config


def candidate_widths(config: Any) -> list[list[int]]:
    """Every narrower choice of stage widths (stage 0 kept, multiples of each stage's unit), the most even
    first: by the smallest kept share of any stage, then by total width, both descending."""
    config = _clean(config)
    widths, units = config["block_out_channels"], _units(config)
    options = [[widths[0]]] + [list(range(c, 0, -u)) for c, u in zip(widths[1:], units[1:])]
    out = [list(w) for w in itertools.product(*options) if list(w) != list(widths)]
    return sorted(out, key=lambda w: (min(n / c for n, c in zip(w, widths)), sum(w)), reverse=True)


def _meta_unet(config: dict[str, Any]) -> diffusers.UNet2DConditionModel:
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel.from_config(config)


def unet_macs(config: dict[str, Any], size: int) -> int:
    """MACs of one U-Net call on `size`² latents, counted on the meta device (as `pocketdiff.costs` counts)."""
    unet = _meta_unet(config)
    with torch.device("meta"):
        x = torch.zeros(1, config["in_channels"], size, size)
        context = torch.zeros(1, 77, config["cross_attention_dim"])
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(x, torch.tensor([999]), encoder_hidden_states=context)
    return counter.get_total_flops() // 2


def plan_widths(config: Any, target: float, size: int) -> tuple[dict[str, Any], float]:
    """The widest valid config removing at least `target` of the U-Net's MACs on `size`² latents, and the
    share it removes.

    Valid also means the same tensors as the teacher: a resnet whose input and output widths become equal
    would lose its shortcut convolution (or gain a new one), which is a different function, not a subset."""
    config = _clean(config)
    full = unet_macs(config, size)
    keys = set(_meta_unet(config).state_dict())
    candidates = candidate_widths(config)
    best: tuple[float, list[int]] = (0.0, list(config["block_out_channels"]))
    floor = pruned_config(config, min(candidates, key=sum)) if candidates else None
    if floor is not None and set(_meta_unet(floor).state_dict()) == keys:  # the narrowest fails: refuse at once
        best = (1 - unet_macs(floor, size) / full, floor["block_out_channels"])
        candidates = candidates if best[0] >= target else []
    for widths in candidates:
        candidate = pruned_config(config, widths)
        if set(_meta_unet(candidate).state_dict()) != keys:
            continue
        removed = 1 - unet_macs(candidate, size) / full
        if removed >= target:
            return candidate, removed
        best = max(best, (removed, widths))
    raise ConfigError(f"pruning to {target:.0%} fewer U-Net MACs is not possible: the narrowest valid widths "
                      f"{best[1]} (stage 0 kept; each stage a multiple of {_units(config)} for whole GroupNorm "
                      f"groups and heads; no resnet may gain or lose its shortcut) remove {best[0]:.0%}; "
                      f"ask for at most {math.floor(best[0] * 100) / 100}")


class _Denoiser(nn.Module):
    """The U-Net as a function of tensors only: what the dependency graph traces."""

    def __init__(self, unet: diffusers.UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context).sample


def accumulate_gradients(bundle: Bundle, batches: int, batch_size: int, seed: int, work_dir: Path,
                         data_limit: int | None) -> None:
    """Sum the denoising loss's gradients into the U-Net's `.grad` over `batches` calibration batches whose
    timesteps spread evenly over the schedule (a stratum per sample), so the Taylor scores see every noise level."""
    unet = bundle.unet
    sched = NoiseSchedule.from_scheduler(bundle.scheduler)
    data = load_latent_data(bundle, work_dir, torch.device("cpu"), data_limit)
    g = torch.Generator().manual_seed(seed)
    total = batches * batch_size
    strata = (torch.arange(total) + torch.rand(total, generator=g)) * sched.steps / total
    order = torch.randperm(total, generator=g)
    unet.zero_grad(set_to_none=True)
    for b in range(batches):
        z0, cond, _, _ = data.sample(g, batch_size)
        t = strata[order[b * batch_size:(b + 1) * batch_size]].long().clamp(max=sched.steps - 1)
        noise = torch.randn(z0.shape, generator=g)
        x_t = sched.add_noise(z0, noise, t)
        out = unet(x_t, t, encoder_hidden_states=cond).sample
        loss = nn.functional.mse_loss(out, sched.output_from(z0, noise, x_t, t))
        (loss / batches).backward()


def _stage(name: str, stages: int) -> int | None:
    """The stage whose width a group rooted at module `name` has; None: not prunable (time embedding, output)."""
    parts = name.split(".")
    if parts[0] == "conv_in":
        return 0
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return stages - 1
    if parts[0] == "up_blocks":
        return stages - 1 - int(parts[1])
    return None


def _balanced(scores: torch.Tensor, parts: int, keep: int) -> list[int]:
    """Indices to prune: the lowest-scoring in each of `parts` equal runs, each run keeping `keep // parts`."""
    size, per = len(scores) // parts, keep // parts
    cut = []
    for p in range(parts):
        run = scores[p * size:(p + 1) * size]
        cut += (p * size + run.argsort()[:size - per]).tolist()
    return cut


def prune_unet(unet: diffusers.UNet2DConditionModel, config: dict[str, Any]) -> diffusers.UNet2DConditionModel:
    """`unet` (its `.grad` holding accumulated gradients) cut to `config`'s widths by Taylor importance;
    returned as a fresh U-Net built from `config`, so the result is exactly what diffusers would load."""
    import torch_pruning as tp  # heavy, only here

    old, new = unet.config.block_out_channels, config["block_out_channels"]
    groups_n = config["norm_num_groups"]
    unet.set_attn_processor(AttnProcessor())  # plain matmuls: the graph sees q·k and the head reshape
    model = _Denoiser(unet)
    c = unet.config.cross_attention_dim
    side = 2 ** len(old)  # the smallest latent every stage's downsampler still halves
    example = (torch.zeros(1, unet.config.in_channels, side, side), torch.tensor([1]), torch.zeros(1, 77, c))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {m: n.removeprefix("unet.") for n, m in model.named_modules()}
    parents = {n.removeprefix("unet."): m for n, m in model.named_modules() if isinstance(m, Attention)}
    importance = tp.importance.GroupTaylorImportance(normalizer=None)
    plans = []
    for group in graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]):
        root = names[group[0].dep.target.module]
        s = _stage(root, len(old))
        if s is None or old[s] == new[s]:
            continue
        scores = importance(group)
        width = len(scores)
        keep = width * new[s] // old[s]
        attention = parents.get(root.rsplit(".", 1)[0])
        if attention is not None:  # q/k/v/out of one attention: whole heads by their summed score
            size = width // attention.heads
            per_head = scores.view(attention.heads, size).sum(1)
            cut = [h * size + i for h in per_head.argsort()[:(width - keep) // size].tolist() for i in range(size)]
        elif root.endswith("ff.net.0.proj"):  # GEGLU: channel i and i + width/2 are one hidden unit
            half = width // 2
            low = (scores[:half] + scores[half:]).argsort()[:half - keep // 2].tolist()
            cut = low + [i + half for i in low]
        elif width == old[s]:  # a stage's or a resnet's channels: balanced within the GroupNorm groups
            cut = _balanced(scores, groups_n, keep)
        else:
            cut = scores.argsort()[:width - keep].tolist()
        plans.append((group[0].dep.target.module, group[0].dep.handler, sorted(cut)))
    for module, handler, cut in plans:
        graph.get_pruning_group(module, handler, idxs=cut).prune()
    with torch.device(next(unet.parameters()).device):
        student = diffusers.UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    wrong = [k for k, v in student.state_dict().items() if k not in state or state[k].shape != v.shape]
    if wrong:
        raise ConfigError(f"pruning left {wrong[0]} with shape {list(state[wrong[0]].shape) if wrong[0] in state else None}"
                          f", the pruned config needs {list(student.state_dict()[wrong[0]].shape)}: this U-Net's "
                          "coupling does not fit one width per stage")
    student.load_state_dict(state)
    return student.eval()


@register_pass
class PrunePass:
    """Cut whole channels and heads by Taylor importance of the denoising loss (Diff-Pruning), per stage."""

    name = "prune"

    @dataclass
    class Settings:
        target: float = setting(0.3, min=0.0, max=1.0, min_exclusive=True, help="share of U-Net MACs to remove")
        batches: int = setting(4, min=1, help="calibration batches for the Taylor importance")
        batch_size: int = setting(8, min=1)
        data_limit: int | None = setting(256, min=1, help="training images the calibration latents come from")
        seed: int = setting(0, min=0)

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        check_teacher(bundle)  # the calibration loss needs its noise schedule and caption states
        plan_widths(bundle.unet.config, s.target, _latent_size(bundle))

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        config, removed = plan_widths(bundle.unet.config, s.target, _latent_size(bundle))
        teacher = bundle.unet
        before = count_params(teacher)
        unet = diffusers.UNet2DConditionModel.from_config(teacher.config)
        unet.load_state_dict(teacher.state_dict())
        unet.float().train().requires_grad_(True)
        accumulate_gradients(_with_unet(bundle, unet), s.batches, s.batch_size, s.seed, ctx.work_dir, s.data_limit)
        student = prune_unet(unet, config)
        bundle.unet = (student if teacher.dtype == torch.float32 else student.to(teacher.dtype)).requires_grad_(False)
        return PassResult(bundle, {"block_out_channels": config["block_out_channels"],
                                   "attention_heads": config["attention_head_dim"],
                                   "macs_removed": round(removed, 4), "params_before": before,
                                   "params_after": count_params(bundle.unet),
                                   "calibration": f"{s.batches} x {s.batch_size} training latents, stratified t"})


def _latent_size(bundle: Bundle) -> int:
    """The side of the latents the Bundle samples at."""
    return bundle.resolution // bundle.vae_scale_factor


def _with_unet(bundle: Bundle, unet: diffusers.UNet2DConditionModel) -> Bundle:
    """A shallow copy of `bundle` holding `unet`."""
    out = copy.copy(bundle)
    out.unet = unet
    return out

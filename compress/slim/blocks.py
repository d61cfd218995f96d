"""Block removal (BK-SDM, Kim et al. 2023): a shallower U-Net that starts from the teacher's kept weights.

The mechanism (`plan_removal`) takes the names of what to remove and returns the student's
diffusers config and, for every student tensor, the teacher tensor it starts from. The policy is a
preset or an explicit list of names:

    down_blocks.S.resnets.J   pair J of down stage S: the resnet and the attention beside it
    up_blocks.U.resnets.J     pair J of up stage U (up stages count from the innermost)
    mid_block                 the whole mid-block
    down_blocks.S, up_blocks.0  the innermost stage (S the last down stage), named together

Presets, written for any `UNet2DConditionModel` with the same rule BK-SDM applies to SD1.4:
`base` keeps one pair per down stage (the first) and two per up stage (the first and the last,
whose skip comes from the shallower stage, so every kept tensor keeps its shape); `small` also
removes the mid-block; `tiny` also removes the innermost stage. A diffusers U-Net always has one
more pair per up stage than its mirrored down stage, so removals must mirror; whatever does not
fit the topology is a ConfigError before any work. The result is a plain diffusers U-Net with its
config rewritten (`layers_per_block` per stage, `mid_block_type`, the per-stage lists).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import diffusers
import torch

from ...bundle import Bundle
from ...errors import ConfigError
from ...passes import PassContext, PassResult, register_pass
from ...settings import setting

PRESETS = ("base", "small", "tiny")
# Config keys that hold one value per stage, in down order or (the reverse_ one) in up order.
_DOWN_ORDER_LISTS = ("block_out_channels", "down_block_types", "attention_head_dim", "num_attention_heads",
                     "transformer_layers_per_block", "cross_attention_dim", "only_cross_attention", "layers_per_block")
_UP_ORDER_LISTS = ("up_block_types", "reverse_transformer_layers_per_block")
_PAIR = re.compile(r"^(down|up)_blocks\.(\d+)\.resnets\.(\d+)$")
_STAGE = re.compile(r"^(down|up)_blocks\.(\d+)$")


@dataclass
class RemovalPlan:
    """What block removal keeps: the student's config and where each student tensor comes from."""

    config: dict[str, Any]
    kept_down: list[list[int]]  # per student down stage: the teacher pair indices kept, in order
    kept_up: list[list[int]]  # per student up stage
    removed: list[str]
    up_offset: int = 0  # teacher up stage = student up stage + this (1 when the innermost stage goes)
    keep_mid: bool = True
    names: dict[str, str] = field(default_factory=dict)  # student tensor name -> teacher tensor name


def _layers(config: dict[str, Any]) -> list[int]:
    n = len(config["down_block_types"])
    lpb = config["layers_per_block"]
    return list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n


def preset_removals(config: dict[str, Any], preset: str) -> list[str]:
    """The names preset `preset` removes from a U-Net of `config`; ConfigError when it does not fit."""
    layers = _layers(config)
    n = len(layers)
    if min(layers) < 2:
        raise ConfigError(f"block-removal preset {preset!r} keeps one pair per down stage and two per up stage, "
                          f"but this U-Net has only {min(layers)} pair(s) in a down stage (layers_per_block "
                          f"{config['layers_per_block']}): nothing to remove; name blocks in `remove` instead")
    names = [f"down_blocks.{s}.resnets.{j}" for s in range(n) for j in range(1, layers[s])]
    # up stage u mirrors down stage n-1-u and has layers+1 pairs: keep the first and the last.
    names += [f"up_blocks.{u}.resnets.{j}" for u in range(n) for j in range(1, layers[n - 1 - u])]
    if preset in ("small", "tiny"):
        if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
            raise ConfigError(f"block-removal preset {preset!r} removes the mid-block, and this U-Net has none")
        names.append("mid_block")
    if preset == "tiny":
        if n < 2:
            raise ConfigError("block-removal preset 'tiny' removes the innermost stage, and this U-Net has one stage")
        names = [x for x in names if not x.startswith((f"down_blocks.{n - 1}.", "up_blocks.0."))]
        names += [f"down_blocks.{n - 1}", "up_blocks.0"]
    return names


def _block_description(config: dict[str, Any]) -> str:
    layers = _layers(config)
    return (f"this U-Net has down_blocks.0-{len(layers) - 1} with {layers} pairs, up_blocks.0-{len(layers) - 1} "
            f"with {[x + 1 for x in reversed(layers)]} pairs, "
            + ("a mid_block" if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None else "no mid_block"))


def plan_removal(config: dict[str, Any], remove: list[str]) -> RemovalPlan:
    """The student config and tensor mapping for removing `remove` from a U-Net of `config`."""
    # diffusers' private keys go: `_use_default_values` would turn a removed mid-block back into the default one.
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    layers = _layers(config)
    n = len(layers)
    drop_down: list[set[int]] = [set() for _ in range(n)]
    drop_up: list[set[int]] = [set() for _ in range(n)]
    stages: set[str] = set()
    keep_mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None
    where = _block_description(config)
    if not remove:
        raise ConfigError("block removal: the list of blocks to remove is empty")
    for name in remove:
        pair, stage = _PAIR.match(name), _STAGE.match(name)
        if name == "mid_block":
            if not keep_mid:
                raise ConfigError(f"block removal names mid_block, which does not exist: {where}")
            keep_mid = False
        elif pair:
            side, s, j = pair.group(1), int(pair.group(2)), int(pair.group(3))
            count = (layers[s] if side == "down" else layers[n - 1 - s] + 1) if s < n else 0
            if j >= count:
                raise ConfigError(f"block removal names {name}, which does not exist: {where}")
            (drop_down if side == "down" else drop_up)[s].add(j)
        elif stage and int(stage.group(2)) < n:
            stages.add(name)
        else:
            raise ConfigError(f"block removal names {name!r}, which does not exist or is not removable "
                              f"(names: down_blocks.S.resnets.J, up_blocks.U.resnets.J, mid_block, or the innermost "
                              f"stage as down_blocks.{n - 1} with up_blocks.0): {where}")
    drop_stage = bool(stages)
    if drop_stage and stages != {f"down_blocks.{n - 1}", "up_blocks.0"}:
        raise ConfigError(f"block removal can remove only the innermost stage, named as down_blocks.{n - 1} "
                          f"together with up_blocks.0; got {', '.join(sorted(stages))}")
    if drop_stage and n < 2:
        raise ConfigError("block removal cannot remove the only stage of a U-Net")
    kept_down = [[j for j in range(layers[s]) if j not in drop_down[s]] for s in range(n)]
    kept_up = [[j for j in range(layers[n - 1 - u] + 1) if j not in drop_up[u]] for u in range(n)]
    for s in range(n - 1 if drop_stage else n):
        u = n - 1 - s
        if not kept_down[s]:
            raise ConfigError(f"block removal empties down_blocks.{s}: a stage keeps at least one pair "
                              "(remove the innermost stage as a whole instead)")
        if len(kept_up[u]) != len(kept_down[s]) + 1:
            raise ConfigError(f"block removal keeps {len(kept_down[s])} pair(s) in down_blocks.{s} and "
                              f"{len(kept_up[u])} in up_blocks.{u}: a diffusers U-Net has one more pair in an up "
                              f"stage than in its mirrored down stage; remove {len(kept_up[u]) - len(kept_down[s]) - 1} "
                              f"more from up_blocks.{u} or fewer from down_blocks.{s}")
    if drop_stage:
        kept_down, kept_up = kept_down[:-1], kept_up[1:]
        for key in _DOWN_ORDER_LISTS:
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[:-1]
        for key in _UP_ORDER_LISTS:
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[1:]
    counts = [len(k) for k in kept_down]
    config["layers_per_block"] = counts[0] if len(set(counts)) == 1 else counts
    if not keep_mid:
        config["mid_block_type"] = None
    return RemovalPlan(config, kept_down, kept_up, list(remove), 1 if drop_stage else 0, keep_mid)


_STUDENT_KEY = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$")


def teacher_name(plan: RemovalPlan, key: str) -> str:
    """The teacher tensor a student tensor starts from."""
    m = _STUDENT_KEY.match(key)
    if not m:
        return key
    side, stage, kind, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "up":
        teacher_stage = stage + plan.up_offset
        kept = plan.kept_up[stage]
    else:
        teacher_stage, kept = stage, plan.kept_down[stage]
    if kind in ("resnets", "attentions"):
        index = kept[index]
    return f"{side}_blocks.{teacher_stage}.{kind}.{index}.{rest}"


def build_student(teacher: diffusers.UNet2DConditionModel, plan: RemovalPlan) -> diffusers.UNet2DConditionModel:
    """The student U-Net of `plan` with every tensor copied from the teacher; ConfigError if a kept block
    cannot take its teacher's weights (its inputs changed width)."""
    device = next(teacher.parameters()).device
    with torch.device(device):
        student = diffusers.UNet2DConditionModel.from_config(plan.config)
    source = teacher.state_dict()
    state = {}
    for key, tensor in student.state_dict().items():
        name = teacher_name(plan, key)
        if name not in source or source[name].shape != tensor.shape:
            got = "is missing" if name not in source else f"has shape {list(source[name].shape)}"
            raise ConfigError(f"block removal keeps {key.rsplit('.', 2)[0]} but its teacher tensor {name} {got}, "
                              f"the student needs {list(tensor.shape)}: the kept block's input changed width; keep "
                              "the first pair of each stage and the last of each up stage")
        state[key] = source[name]
    student.load_state_dict(state)
    plan.names = {k: teacher_name(plan, k) for k in state}
    dtype = next(teacher.parameters()).dtype
    return (student if dtype == torch.float32 else student.to(dtype=dtype)).eval()


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


@register_pass
class BlockRemovalPass:
    """Remove resnet+attention pairs, the mid-block and/or the innermost stage (BK-SDM), keeping the rest's weights."""

    name = "remove-blocks"

    @dataclass
    class Settings:
        preset: Literal["base", "small", "tiny"] | None = setting(None, help="BK-SDM preset")
        remove: list[str] = setting(default_factory=list, help="explicit names to remove, instead of a preset")

        def __post_init__(self) -> None:
            if (self.preset is None) == (not self.remove):
                raise ValueError("give exactly one of `preset` (base, small, tiny) and a non-empty `remove` list")

    def check(self, bundle: Bundle, s: Settings, ctx: PassContext) -> None:
        plan_for(bundle.unet.config, s)

    def apply(self, bundle: Bundle, s: Settings, ctx: PassContext) -> PassResult:
        plan = plan_for(bundle.unet.config, s)
        before = count_params(bundle.unet)
        bundle.unet = build_student(bundle.unet, plan).requires_grad_(False)
        return PassResult(bundle, {"removed": plan.removed, "params_before": before,
                                   "params_after": count_params(bundle.unet),
                                   "layers_per_block": plan.config["layers_per_block"],
                                   "mid_block": plan.keep_mid, "stages": len(plan.config["down_block_types"])})


def plan_for(config: Any, s: BlockRemovalPass.Settings) -> RemovalPlan:
    """The removal plan of a pass's settings on a U-Net config."""
    config = dict(config)
    return plan_removal(config, preset_removals(config, s.preset) if s.preset is not None else list(s.remove))

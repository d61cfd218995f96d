"""Write a Bundle as an original-format (LDM / CompVis) single-file SD1.x checkpoint, for tests.

The inverse of diffusers' single-file conversion, generalised over the number of U-Net stages and
layers per block, so a small SD-topology pipeline can stand in for a real SD1.5 `.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def _unet_prefixes(config: dict) -> list[tuple[str, str]]:
    n, lpb = len(config["block_out_channels"]), config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    pairs = []
    for i in range(n):
        for j in range(lpb):
            k = 1 + i * (lpb + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0."))
            if down_attn[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1."))
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (lpb + 1)}.0.op."))
        for j in range(lpb + 1):
            k = i * (lpb + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0."))
            if up_attn[i]:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1."))
        if i < n - 1:
            k = i * (lpb + 1) + lpb
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{k}.{2 if up_attn[i] else 1}."))
    pairs += [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
              ("mid_block.resnets.1.", "middle_block.2.")]
    return pairs


_UNET_FIXED = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
               "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> `model.diffusion_model.*` keys."""
    prefixes = _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        new = key
        for hf, sd in _UNET_FIXED.items():
            if new.startswith(hf):
                new = sd + new[len(hf):]
        for hf, sd in prefixes:
            if new.startswith(hf):
                rest = new[len(hf):]
                if ".resnets." in hf:
                    for a, b in _UNET_RESNET:
                        rest = rest.replace(a, b)
                new = sd + rest
                break
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> `first_stage_model.*` keys."""
    n = len(config["block_out_channels"])
    pairs = []
    for i in range(n):
        for j in range(config["layers_per_block"]):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        for j in range(config["layers_per_block"] + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}."))
        if i < n - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    for part in ("encoder", "decoder"):
        for j in range(2):
            pairs.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}."))
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in state.items():
        new = key
        for hf, sd in pairs:
            if new.startswith(hf):
                rest = new[len(hf):]
                if "attentions" in hf:
                    for a, b in attn:
                        if rest.startswith(a):
                            rest = b + rest[len(a):]
                            if value.ndim == 2:
                                value = value[:, :, None, None]
                new = sd + rest.replace("conv_shortcut", "nin_shortcut")
                break
        new = new.replace("conv_norm_out", "norm_out")
        out["first_stage_model." + new] = value
    return out


def save_ldm_checkpoint(bundle, path: Path) -> None:
    """Write unet + vae + CLIP text encoder of `bundle` as one SD1.x-format .safetensors file."""
    state = {**unet_to_ldm(bundle.unet.state_dict(), dict(bundle.unet.config)),
             **vae_to_ldm(bundle.vae.state_dict(), dict(bundle.vae.config)),
             **{"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                for k, v in bundle.text_encoder.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))

"""Original-format (CompVis / LDM) single-file `.safetensors` checkpoints: load SD1.x/SD2.x, save SD1.x.

diffusers' single-file loader does the key conversion; pocketdiff supplies the component configs
offline, from a diffusers folder the user names or, for checkpoints with SD1.5's or SD2.1-base's
shapes, from the architecture zoo. A single file carries no tokenizer: it comes from the config
folder's tokenizer/ when there is one, else the Bundle has none and cannot sample from prompts
(export, info and compression work without it). Saving is the inverse of diffusers' conversion,
generalised over the number of U-Net stages and layers per block.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import diffusers
import torch
from safetensors.torch import save

from .bundle import Bundle, Manifest, check_safetensors_file
from .errors import ConfigError, InputPathError
from .fileio import atomic_write_bytes, hash_file

_UNET = "model.diffusion_model."
_FAMILIES = {  # a key only that family's checkpoints hold -> the zoo architecture with its shapes
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": "sd15",
    "cond_stage_model.model.token_embedding.weight": "sd21",
}


def detect_family(keys: list[str]) -> str:
    """'sd15' or 'sd21' from the checkpoint's tensor names; ConfigError for anything else."""
    if not any(k.startswith(_UNET) for k in keys):
        raise ConfigError("not an original-format Stable Diffusion checkpoint (no model.diffusion_model.* "
                          "tensors); give a diffusers folder instead")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ConfigError("SDXL single-file checkpoints are not supported; convert to a diffusers folder")
    for key, family in _FAMILIES.items():
        if key in keys:
            return family
    raise ConfigError("the checkpoint has no text encoder pocketdiff recognises (SD1.x CLIP or SD2.x OpenCLIP)")


def write_zoo_config(arch: str, folder: Path) -> None:
    """The component configs (no weights, no tokenizer) of zoo architecture `arch`, as a diffusers folder."""
    from .zoo import build_arch

    bundle = build_arch(arch, device="meta")
    bundle.unet.save_config(folder / "unet")
    bundle.vae.save_config(folder / "vae")
    bundle.scheduler.save_config(folder / "scheduler")
    bundle.text_encoder.config.save_pretrained(folder / "text_encoder")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def load_single_file(path: Path, config: Path | None = None, dtype: torch.dtype = torch.float32) -> Bundle:
    """A Bundle from checkpoint `path`, with configs from folder `config` or the zoo."""
    path = Path(path)
    if not path.is_file():
        raise InputPathError(f"{path}: no such checkpoint file")
    keys = check_safetensors_file(path)
    family = detect_family(keys)
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise InputPathError(f"{config}: not a diffusers config folder (no model_index.json)")
    with tempfile.TemporaryDirectory(prefix="pocketdiff-config-") as tmp:
        folder = Path(config) if config is not None else Path(tmp)
        if config is None:
            write_zoo_config(family, folder)
        has_tokenizer = (folder / "tokenizer").is_dir()
        extra = {} if has_tokenizer else {"tokenizer": None}
        try:
            pipe = diffusers.StableDiffusionPipeline.from_single_file(
                str(path), config=str(folder), local_files_only=True, torch_dtype=dtype,
                safety_checker=None, feature_extractor=None, **extra)
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            hint = "" if config is not None else f" (its shapes are not {family}'s: pass the matching config folder)"
            raise ConfigError(f"{path}: the weights do not match the config{hint}: "
                              f"{str(e).strip().splitlines()[0][:300]}") from e
    source = {"kind": "single-file", "path": str(path.resolve()), "hash": hash_file(path), "family": family,
              "config": str(config) if config is not None else f"zoo:{family}"}
    return Bundle(unet=pipe.unet.eval(), vae=pipe.vae.eval(),
                  scheduler=diffusers.DDIMScheduler.from_config(pipe.scheduler.config),
                  text_encoder=pipe.text_encoder.eval(), tokenizer=pipe.tokenizer,
                  manifest=Manifest(source=source, content_hash=source["hash"]))

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
        out[_UNET + new] = value
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


def save_single_file(bundle: Bundle, path: Path) -> None:
    """Write the U-Net, VAE and CLIP text encoder of `bundle` as one SD1.x original-format .safetensors
    file (what single-file UIs load); the inverse of `load_single_file`."""
    state = {**unet_to_ldm(bundle.unet.state_dict(), dict(bundle.unet.config)),
             **vae_to_ldm(bundle.vae.state_dict(), dict(bundle.vae.config)),
             **{"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                for k, v in bundle.text_encoder.state_dict().items()}}
    if bundle.text_encoder is None or type(bundle.text_encoder).__name__ != "CLIPTextModel":
        raise ConfigError("an SD1.x single file holds a CLIP text encoder; this model has none")
    state = {k: v.contiguous() for k, v in state.items()}
    atomic_write_bytes(Path(path), save(state))

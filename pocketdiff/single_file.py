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
import re
import tempfile
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors.torch import save

from .bundle import (MODEL_COMPONENTS, Bundle, Manifest, TensorEntry, check_config, check_materialized,
                     check_safetensors_file, check_tensor_sets, first_line, quiet_progress)
from .errors import ConfigError, InputPathError
from .fileio import atomic_write_bytes, hash_file

_UNET = "model.diffusion_model."
_FAMILIES = {  # a key only that family's checkpoints hold -> the zoo architecture with its shapes
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": "sd15",
    "cond_stage_model.model.token_embedding.weight": "sd21",
}


def detect_family(keys: list[str], where: str = "the checkpoint") -> str:
    """'sd15' or 'sd21' from the checkpoint's tensor names; ConfigError for anything else."""
    if not any(k.startswith(_UNET) for k in keys):
        raise ConfigError(f"{where}: not an original-format Stable Diffusion checkpoint (no model.diffusion_model.* "
                          "tensors); give a diffusers folder instead")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ConfigError(f"{where}: SDXL single-file checkpoints are not supported; convert to a diffusers folder")
    for key, family in _FAMILIES.items():
        if key in keys:
            return family
    raise ConfigError(f"{where}: no text encoder pocketdiff recognises (SD1.x CLIP or SD2.x OpenCLIP tensors)")


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
    """A Bundle from checkpoint `path`, with configs from folder `config` or the zoo. Every tensor the
    configs need is checked against the checkpoint's header before any weights are read, and no
    parameter is left unloaded."""
    path = Path(path)
    if not path.is_file():
        raise InputPathError(f"{path}: no such checkpoint file")
    entries = check_safetensors_file(path)
    family = detect_family(list(entries), str(path))
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise InputPathError(f"{config}: not a diffusers config folder (no model_index.json)")
    hint = (f"the checkpoint is incomplete, or it and {config} describe different models: pass the config "
            "folder it was made with"
            if config is not None else f"its shapes are not {family}'s: pass the matching config folder "
            "with --model-config")
    with tempfile.TemporaryDirectory(prefix="pocketdiff-config-") as tmp:
        folder = Path(config) if config is not None else Path(tmp)
        if config is None:
            write_zoo_config(family, folder)
        check_checkpoint_tensors(path, entries, expected_tensors(folder, family), hint)
        has_tokenizer = (folder / "tokenizer").is_dir()
        extra = {} if has_tokenizer else {"tokenizer": None}
        try:
            with quiet_progress():
                pipe = diffusers.StableDiffusionPipeline.from_single_file(
                    str(path), config=str(folder), local_files_only=True, torch_dtype=dtype,
                    safety_checker=None, feature_extractor=None, **extra)
        except Exception as e:  # diffusers' single-file conversion raises many untyped errors
            raise ConfigError(f"{path}: the weights do not match the config ({hint}): {first_line(e)}") from e
    for name in MODEL_COMPONENTS:
        check_materialized(getattr(pipe, name), f"{path}: {name}")
    source = {"kind": "single-file", "path": str(path.resolve()), "hash": hash_file(path), "family": family,
              "config": str(config) if config is not None else f"zoo:{family}"}
    return Bundle(unet=pipe.unet.eval(), vae=pipe.vae.eval(),
                  scheduler=diffusers.DDIMScheduler.from_config(pipe.scheduler.config),
                  text_encoder=pipe.text_encoder.eval(), tokenizer=pipe.tokenizer,
                  manifest=Manifest(source=source, content_hash=source["hash"]))


_PARTS = {"unet": (_UNET, "U-Net"), "vae": ("first_stage_model.", "VAE"),
          "text_encoder": ("cond_stage_model.", "text encoder")}


@torch.no_grad()
def expected_tensors(folder: Path, family: str) -> dict[str, tuple[dict[str, tuple[int, ...]], set[str]]]:
    """Per component: the original-format tensor names and shapes the configs in `folder` need (models built
    on the meta device, so nothing is allocated), and the names a checkpoint may carry unused."""
    te_config = check_config(folder / "text_encoder", "text_encoder")
    if te_config.get("model_type") != "clip_text_model":
        raise ConfigError(f"{folder / 'text_encoder' / 'config.json'}: a single-file {family} checkpoint holds a "
                          f"CLIP text encoder, this config describes {te_config.get('model_type')!r}")
    unet_config, vae_config = check_config(folder / "unet", "unet"), check_config(folder / "vae", "vae")
    try:
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel.from_config(unet_config)
            vae = diffusers.AutoencoderKL.from_config(vae_config)
            text = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(te_config))
    except Exception as e:  # diffusers / transformers reject inconsistent configs with untyped errors
        raise ConfigError(f"{folder}: the configs do not describe a model ({first_line(e)})") from e
    te_state = text.state_dict()
    if family == "sd21":
        te_state, unused = open_clip_to_ldm(te_state), _open_clip_unused(text.config.num_hidden_layers)
    else:
        te_state, unused = clip_to_ldm(te_state), set()
    shapes = {"unet": unet_to_ldm(unet.state_dict(), dict(unet.config)),
              "vae": vae_to_ldm(vae.state_dict(), dict(vae.config)), "text_encoder": te_state}
    return {name: ({k: tuple(v.shape) for k, v in state.items()}, unused if name == "text_encoder" else set())
            for name, state in shapes.items()}


def check_checkpoint_tensors(path: Path, entries: dict[str, TensorEntry],
                             expected: dict[str, tuple[dict[str, tuple[int, ...]], set[str]]], hint: str) -> None:
    """ConfigError naming the component and its missing, unexpected or mis-shaped tensors (first few + count)."""
    for name, (need, unused) in expected.items():
        prefix, label = _PARTS[name]
        found = {k: e.shape for k, e in entries.items() if k.startswith(prefix)}
        if not found:
            raise ConfigError(f"{path}: the checkpoint holds no {label} (no {prefix}* tensors); use a checkpoint "
                              "that carries the U-Net, VAE and text encoder, or a diffusers folder")
        misshaped = {k: f"file {list(found[k])}, config {list(need[k])}" for k in need.keys() & found.keys()
                     if _squeeze(found[k]) != _squeeze(need[k])}
        missing, extra = need.keys() - found.keys(), found.keys() - need.keys() - unused
        check_tensor_sets(f"{path}: {label}", missing, extra, misshaped, hint)


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without trailing 1s: the VAE's attention projections are 1x1 convs or linears alike."""
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel state dict -> SD1.x `cond_stage_model.transformer.text_model.*` keys."""
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


_OPEN_CLIP = "cond_stage_model.model."
_OPEN_CLIP_FIXED = {"embeddings.position_embedding.weight": "positional_embedding",
                    "embeddings.token_embedding.weight": "token_embedding.weight",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$")


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel state dict -> SD2.x OpenCLIP `cond_stage_model.model.*` keys (q, k and v
    fused into in_proj, as diffusers' conversion splits them)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        if key in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP + _OPEN_CLIP_FIXED[key]] = value
        elif m := _QKV.match(key):
            layer, kind = m.groups()
            out[f"{_OPEN_CLIP}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
        elif key.startswith("encoder.layers."):
            new = key.replace("encoder.layers.", "transformer.resblocks.", 1)
            for a, b in _OPEN_CLIP_LAYER:
                new = new.replace(a, b)
            out[_OPEN_CLIP + new] = value
    return out


def _open_clip_unused(layers: int) -> set[str]:
    """SD2.x checkpoints carry OpenCLIP's last layer, which SD2 does not use (it takes the penultimate one)."""
    block = f"{_OPEN_CLIP}transformer.resblocks.{layers}."
    return {block + n for n in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                                "attn.out_proj.bias", "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                                "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")}

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
    if bundle.text_encoder is None or type(bundle.text_encoder).__name__ != "CLIPTextModel":
        raise ConfigError("an SD1.x single file holds a CLIP text encoder; this model has none")
    state = {**unet_to_ldm(bundle.unet.state_dict(), dict(bundle.unet.config)),
             **vae_to_ldm(bundle.vae.state_dict(), dict(bundle.vae.config)),
             **clip_to_ldm(bundle.text_encoder.state_dict())}
    state = {k: v.contiguous() for k, v in state.items()}
    atomic_write_bytes(Path(path), save(state))

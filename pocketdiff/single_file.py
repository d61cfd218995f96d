"""Load an original-format (CompVis / LDM) single-file SD1.x or SD2.x `.safetensors` checkpoint.

diffusers' single-file loader does the key conversion; pocketdiff supplies the component configs
offline, from a diffusers folder the user names or, for checkpoints with SD1.5's or SD2.1-base's
shapes, from the architecture zoo. A single file carries no tokenizer: it comes from the config
folder's tokenizer/ when there is one, else the Bundle has none and cannot sample from prompts
(export, info and compression work without it).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import diffusers
import torch

from .bundle import Bundle, Manifest, check_safetensors_file
from .errors import ConfigError, InputPathError

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


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


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
    source = {"kind": "single-file", "path": str(path.resolve()), "hash": _file_hash(path), "family": family,
              "config": str(config) if config is not None else f"zoo:{family}"}
    return Bundle(unet=pipe.unet.eval(), vae=pipe.vae.eval(),
                  scheduler=diffusers.DDIMScheduler.from_config(pipe.scheduler.config),
                  text_encoder=pipe.text_encoder.eval(), tokenizer=pipe.tokenizer,
                  manifest=Manifest(source=source, content_hash=source["hash"]))

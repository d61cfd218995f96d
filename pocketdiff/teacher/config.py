"""Architecture and training settings of the built-in "fashion" teacher.

Stable Diffusion's structure at reduced width: an AutoencoderKL with 4 latent channels (factor 4:
64x64 images, 16x16 latents), SD1.5's U-Net topology (four stages, cross-attention in the first
three, two layers per block, cross-attention mid-block) and the frozen all-MiniLM-L6-v2 encoder
(384-d token states, 77 tokens). Epsilon prediction, SD's scaled-linear noise schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..zoo import SD_SCHEDULER

UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [32, 64, 128, 128],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 384,
    "attention_head_dim": [2, 4, 8, 8],  # diffusers' name for the head count: 16-d heads everywhere
    "norm_num_groups": 32,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}
SCHEDULER = {**SD_SCHEDULER, "prediction_type": "epsilon"}


@dataclass
class TrainConfig:
    """Training settings: the defaults train a teacher from scratch; the shipped weights' exact
    commands (several resumed runs) are in docs/BENCHMARKS.md."""

    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 256
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    decoder_steps: int = 0  # > 0: fine-tune the VAE decoder, encoder frozen (teacher/decoder.py)
    decoder_batch: int = 256
    decoder_lr: float = 1e-4
    decoder_adv_weight: float = 0.1
    unet_steps: int = 6000
    unet_batch: int = 512
    unet_lr: float = 4e-4
    warmup: int = 300
    ema_decay: float = 0.9995
    uncond_prob: float = 0.1
    checkpoint_every: int = 500
    time_limit_s: float | None = None  # stop (resumably) after this long per phase
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

"""Architecture and training settings of the built-in "fashion" teacher.

Stable Diffusion's structure at reduced width: an AutoencoderKL with 4 latent channels (factor 4:
64x64 images, 16x16 latents), SD1.5's U-Net topology (four stages, cross-attention in the first
three, two layers per block, cross-attention mid-block) and the frozen all-MiniLM-L6-v2 encoder
(384-d token states, 77 tokens). Epsilon prediction, SD's scaled-linear noise schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..settings import setting
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
    commands (several resumed runs) are in docs/BENCHMARKS.md. `pocketdiff train teacher` takes
    each field as a flag (`--unet-lr`, ...), checked by `pocketdiff.settings`."""

    seed: int = setting(0, min=0, help="seed of every phase")
    vae_steps: int = setting(3000, min=0, help="VAE training steps")
    vae_batch: int = setting(256, min=1)
    vae_lr: float = setting(1e-3, min=0.0, min_exclusive=True)
    vae_kl_weight: float = setting(1e-6, min=0.0)
    decoder_steps: int = setting(0, min=0, help="> 0: fine-tune the VAE decoder, encoder frozen (teacher/decoder.py)")
    decoder_batch: int = setting(256, min=1)
    decoder_lr: float = setting(1e-4, min=0.0, min_exclusive=True)
    decoder_adv_weight: float = setting(0.1, min=0.0, help="weight of the PatchGAN term (0: none)")
    unet_steps: int = setting(6000, min=0, help="U-Net training steps")
    unet_batch: int = setting(512, min=1)
    unet_lr: float = setting(4e-4, min=0.0, min_exclusive=True)
    warmup: int = setting(300, min=0, help="linear warm-up steps of each phase")
    ema_decay: float = setting(0.9995, min=0.0, max=1.0)
    uncond_prob: float = setting(0.1, min=0.0, max=1.0, help="share of empty captions (for guidance)")
    checkpoint_every: int = setting(500, min=1)
    time_limit: float | None = setting(None, min=0.0, help="seconds per phase before a resumable stop")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

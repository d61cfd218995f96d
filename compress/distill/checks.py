"""Checks a distillation pass runs before any training: is the teacher a text-to-image model it can
distil, and can the student learn from it? Each failure is a ConfigError that says what to change."""

from __future__ import annotations

import os

from ...bundle import Bundle
from ...errors import ConfigError
from .data import TEXT_STATES_ENV
from .schedule import PREDICTIONS


def check_teacher(teacher: Bundle) -> None:
    """The teacher has a cross-attention U-Net, a VAE, a DDPM-family noise schedule and text states."""
    unet = teacher.unet
    if getattr(unet.config, "cross_attention_dim", None) is None:
        raise ConfigError("the teacher's U-Net has no cross-attention: step distillation needs a text-to-image teacher")
    if not hasattr(teacher.scheduler, "alphas_cumprod"):
        raise ConfigError(f"the teacher's scheduler {type(teacher.scheduler).__name__} has no DDPM noise schedule "
                          "(alphas_cumprod); give a Stable-Diffusion-family teacher")
    kind = teacher.scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise ConfigError(f"teacher prediction type {kind!r} is not supported; supported: {', '.join(PREDICTIONS)}")
    if unet.config.get("time_cond_proj_dim") is not None:
        raise ConfigError("the teacher already takes a guidance input (a distilled student?); distil from the "
                          "original model")
    if teacher.text_encoder is None and not os.environ.get(TEXT_STATES_ENV):
        raise ConfigError(f"the teacher has no text encoder and {TEXT_STATES_ENV} is not set: the captions "
                          "cannot be encoded")


def check_student(student: Bundle, teacher: Bundle) -> None:
    """The student's U-Net takes the teacher's latents and text states."""
    s, t = student.unet.config, teacher.unet.config
    for key in ("in_channels", "out_channels", "cross_attention_dim"):
        if s.get(key) != t.get(key):
            raise ConfigError(f"student U-Net {key} is {s.get(key)}, the teacher's {t.get(key)}: the student "
                              "must take the teacher's latents and text states")
    if student.vae_scale_factor != teacher.vae_scale_factor:
        raise ConfigError("student and teacher VAEs downsample differently; distil with the teacher's VAE")

"""Calibration data recorded along the sampler the Bundle will actually run.

Diffusion U-Net activations shift with the timestep, so static int8 ranges come from every U-Net
call of the deployed sampling loop (`pocketdiff.sampler.generate`: its scheduler, step count,
guidance, the cond and uncond halves of each CFG call) over at least `MIN_PROMPTS` varied prompts,
one seed per image. The set is stored as one safetensors file with its recipe in the metadata
(prompts, seed, sampler settings, the U-Net's weight fingerprint), so a figure made from it can be
reproduced and a set recorded on another model is refused.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save

from ...bundle import Bundle
from ...data import CLASSES, TEMPLATES
from ...errors import ConfigError, CorruptFileError, InputPathError
from ...fileio import atomic_write_bytes
from ...sampler import SampleConfig, TorchComponents, generate

CALIBRATION_VERSION = 1
MIN_PROMPTS = 50
# Templates 0 and 1 phrase the prompts validation and prompt accuracy are judged on; calibration never sees them.
CALIBRATION_TEMPLATES = TEMPLATES[2:]
SAMPLING_KEYS = ("scheduler", "steps", "guidance_scale", "negative_prompt")


def default_prompts(seed: int = 0) -> list[str]:
    """Every class in every calibration template, in a seeded order (disjoint from the gates' prompts)."""
    prompts = [t.format(c) for t in CALIBRATION_TEMPLATES for c in CLASSES]
    random.Random(seed).shuffle(prompts)
    return prompts


def weights_fingerprint(bundle: Bundle) -> str:
    """sha256 of the U-Net's and text encoder's weights: what the recorded activations depend on."""
    h = hashlib.sha256()
    for name, module in (("unet", bundle.unet), ("text_encoder", bundle.text_encoder)):
        if module is None:
            continue
        for key, tensor in sorted(module.state_dict().items()):
            h.update(f"{name}.{key}".encode() + b"\0")
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _Recorder(TorchComponents):
    """TorchComponents that keep every U-Net call's inputs (each prompt's text states once)."""

    def __init__(self, bundle: Bundle):
        super().__init__(bundle)
        self.samples: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.call_context: list[int] = []
        self.contexts: list[torch.Tensor] = []

    def predict(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if not self.contexts or context is not self.contexts[-1]:
            self.contexts.append(context)
        self.samples.append(latents.clone())
        self.timesteps.append(t.float().clone())
        self.call_context.append(len(self.contexts) - 1)
        return super().predict(latents, t, context)


@dataclass
class CalibrationSet:
    """Every U-Net call of the sampler over the calibration prompts, and how it was recorded."""

    meta: dict[str, Any]
    sample: torch.Tensor  # [calls, batch, C, h, w], as the U-Net received it (scheduler-scaled)
    timestep: torch.Tensor  # [calls, batch]
    context_index: torch.Tensor  # [calls]: which entry of `context` each call used
    context: torch.Tensor  # [prompts, batch, 77, D]: the (uncond, cond) text states of each prompt

    @property
    def calls(self) -> int:
        """Number of recorded U-Net calls."""
        return int(self.sample.shape[0])

    def unet_feeds(self) -> Iterator[dict[str, np.ndarray]]:
        """The recorded U-Net calls as export-wrapper feeds (sample, timestep, encoder_hidden_states)."""
        for i in range(self.calls):
            yield {"sample": self.sample[i].numpy(), "timestep": self.timestep[i].numpy(),
                   "encoder_hidden_states": self.context[int(self.context_index[i])].numpy()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name."""
        return {"sample": self.sample, "timestep": self.timestep, "context_index": self.context_index,
                "context": self.context}

    def fingerprint(self) -> str:
        """sha256 of the recorded tensors and the recipe: equal for two recordings of the same recipe."""
        h = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
        for name, tensor in self.tensors().items():
            h.update(name.encode() + b"\0" + tensor.contiguous().numpy().tobytes())
        return h.hexdigest()

    def record(self) -> dict[str, Any]:
        """What the quantization spec keeps about this set: the recipe, the call count, the fingerprint."""
        return {**self.meta, "calls": self.calls, "fingerprint": self.fingerprint()}

    def check_model(self, bundle: Bundle, where: str = "the calibration set") -> None:
        """ConfigError when the set was recorded on a model with other U-Net or text-encoder weights."""
        now = weights_fingerprint(bundle)
        if self.meta["model_fingerprint"] != now:
            raise ConfigError(f"{where} was recorded on another model (weights {self.meta['model_fingerprint'][:12]}, "
                              f"this model {now[:12]}); record one for this model with `pocketdiff calibrate`")

    def save(self, path: Path) -> None:
        """Write the set as one safetensors file (recipe in its metadata), atomically."""
        tensors = {k: v.contiguous() for k, v in self.tensors().items()}
        atomic_write_bytes(Path(path), save(tensors, metadata={"pocketdiff_calibration": json.dumps(self.meta)}))

    @classmethod
    def load(cls, path: Path) -> CalibrationSet:
        """Read a set written by `save`; InputPathError / CorruptFileError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise InputPathError(f"{path}: no such calibration file; record one with `pocketdiff calibrate`")
        try:
            tensors = load(path.read_bytes())
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["pocketdiff_calibration"])
        except (SafetensorError, ValueError, KeyError, TypeError) as e:
            raise CorruptFileError(f"{path}: not a pocketdiff calibration file ({e}); record one with "
                                   "`pocketdiff calibrate`") from e
        if meta.get("version") != CALIBRATION_VERSION or set(tensors) != {"sample", "timestep", "context_index",
                                                                         "context"}:
            raise CorruptFileError(f"{path}: calibration file version {meta.get('version')!r} or contents not "
                                   f"understood (version {CALIBRATION_VERSION} expected); record it again")
        return cls(meta=meta, **tensors)


def record_calibration(bundle: Bundle, config: SampleConfig, prompts: list[str] | None = None,
                       seed: int = 0) -> CalibrationSet:
    """Run the Bundle's sampler (`config`: its scheduler, steps, guidance) over `prompts` (default:
    `default_prompts`), image i from seed + i, and keep every U-Net call's inputs."""
    prompts = list(prompts) if prompts is not None else default_prompts(seed)
    if len(prompts) < MIN_PROMPTS or len(set(prompts)) < MIN_PROMPTS:
        raise ConfigError(f"calibration needs at least {MIN_PROMPTS} different prompts, got {len(set(prompts))}")
    config = SampleConfig(**{**config.__dict__, "seed": seed, "batch_size": 1})
    recorder = _Recorder(bundle)
    generate(bundle, prompts, config, recorder, progress=False)
    meta = {"version": CALIBRATION_VERSION, "model_fingerprint": weights_fingerprint(bundle), "prompts": prompts,
            "seed": seed, **{k: getattr(config, k) for k in SAMPLING_KEYS}}
    return CalibrationSet(meta=meta, sample=torch.stack(recorder.samples), timestep=torch.stack(recorder.timesteps),
                          context_index=torch.tensor(recorder.call_context, dtype=torch.int64),
                          context=torch.stack(recorder.contexts).float())

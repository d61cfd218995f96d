"""The quantization spec: typed, versioned, backend-neutral; recorded in an artifact folder's manifest.

A **scheme** names a per-component precision plan and the gates its artifacts must meet. Each
component gets one **kind**:

    float  left as exported
    w8     int8 weights (symmetric, per output channel), float activations: smaller, same kernels
    w8a8   int8 weights (symmetric, per output channel) and int8 activations (static ranges from
           calibration data recorded along the sampler): smaller and int8 kernels
    8da8w  linear layers only: int8 weights (symmetric, per output channel), activations quantized to
           int8 at run time from each call's own range (dynamic): no calibration data
    8da4w  linear layers only: int4 weights (symmetric, per group of `INT4_GROUP` input channels),
           activations quantized to int8 per token at run time (dynamic): no calibration data

Whatever the kind, the parts in `KEEP_FLOAT` stay float (the field's common finding: these break
first; shared/ANCHORS.md). Each backend's quantize step says which kinds it runs and maps these
backend-neutral names onto its own graph. The gate figures and how they were set:
docs/BENCHMARKS.md, "Quantization".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import ConfigError, CorruptFileError

SPEC_VERSION = 1
KINDS = ("float", "w8", "w8a8", "8da8w", "8da4w")
INT4_GROUP = 32  # 8da4w: input channels sharing one weight scale
# Backend-neutral names of what stays float: module-path suffixes of the first and last convolutions
# and the timestep embedding, plus two op families every backend leaves in float.
KEEP_FLOAT = ("conv_in", "conv_out", "time_proj", "time_embedding", "group_norm", "attention_softmax_v")
KEEP_FLOAT_MODULES = ("conv_in", "conv_out", "time_proj", "time_embedding")


@dataclass(frozen=True)
class Gates:
    """What a quantized artifact must meet against the float model to ship."""

    psnr_db: float  # end-to-end images vs the float model's, same prompts and seeds
    rel_l2: dict[str, float]  # per component, on seeded inputs
    layer_rel_l2: float  # a layer above this (vs PyTorch) is named as the worst one when a gate fails
    accuracy_drop: float  # prompt accuracy may fall at most this much below the float model's


@dataclass(frozen=True)
class Scheme:
    """One named quantization plan: a kind per component and its gates."""

    name: str
    summary: str
    kinds: dict[str, str]
    gates: Gates


_WEIGHT_ONLY_GATES = {"text_encoder": 0.1, "unet": 0.05, "vae_decoder": 0.03, "vae_encoder": 0.03}
SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("w8a8", "U-Net static int8 weights and activations; text encoder and VAE int8 weights",
           {"text_encoder": "w8", "unet": "w8a8", "vae_decoder": "w8", "vae_encoder": "w8"},
           Gates(psnr_db=20.0, rel_l2={**_WEIGHT_ONLY_GATES, "unet": 0.5}, layer_rel_l2=0.3, accuracy_drop=0.1)),
    Scheme("w8", "int8 weights everywhere, float activations",
           {"text_encoder": "w8", "unet": "w8", "vae_decoder": "w8", "vae_encoder": "w8"},
           Gates(psnr_db=20.0, rel_l2=_WEIGHT_ONLY_GATES, layer_rel_l2=0.3, accuracy_drop=0.1)),
    Scheme("8da8w", "U-Net and text encoder linears: int8 weights, int8 dynamic activations; convolutions and "
                    "VAE float", {"text_encoder": "8da8w", "unet": "8da8w", "vae_decoder": "float", "vae_encoder": "float"},
           Gates(psnr_db=20.0, rel_l2={**_WEIGHT_ONLY_GATES, "text_encoder": 0.2, "unet": 0.3}, layer_rel_l2=0.3,
                 accuracy_drop=0.1)),
    Scheme("8da4w", "U-Net and text encoder linears: int4 weights per group, int8 dynamic activations; convolutions "
                    "and VAE float", {"text_encoder": "8da4w", "unet": "8da4w", "vae_decoder": "float", "vae_encoder": "float"},
           Gates(psnr_db=20.0, rel_l2={**_WEIGHT_ONLY_GATES, "text_encoder": 0.3, "unet": 0.4}, layer_rel_l2=0.5,
                 accuracy_drop=0.1)),
)}


def get_scheme(name: str) -> Scheme:
    """The scheme called `name`; ConfigError listing the schemes for any other."""
    if name not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {name!r}; choose from {', '.join(SCHEMES)}")
    return SCHEMES[name]


@dataclass
class QuantSpec:
    """What was quantized and how: the scheme, each exported component's kind, what stayed float, and
    the calibration set's record (None when no component needed one)."""

    scheme: str
    kinds: dict[str, str]
    keep_float: tuple[str, ...] = KEEP_FLOAT
    calibration: dict[str, Any] | None = None
    version: int = SPEC_VERSION
    gates: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_calibration(self) -> bool:
        """Whether any component quantizes activations (static ranges need calibration data)."""
        return "w8a8" in self.kinds.values()

    def to_json(self) -> dict[str, Any]:
        """The manifest entry."""
        return {"version": self.version, "scheme": self.scheme, "kinds": self.kinds,
                "keep_float": list(self.keep_float), "calibration": self.calibration, "gates": self.gates}

    @classmethod
    def from_json(cls, data: Any, where: str) -> QuantSpec:
        """A spec from its manifest entry; CorruptFileError naming what is wrong (version, scheme, kinds)."""
        if not isinstance(data, dict) or data.get("version") != SPEC_VERSION:
            raise CorruptFileError(f"{where}: quantization spec version "
                                   f"{data.get('version') if isinstance(data, dict) else data!r} is not "
                                   f"{SPEC_VERSION}; re-export the folder")
        kinds = data.get("kinds")
        if data.get("scheme") not in SCHEMES or not isinstance(kinds, dict) or \
                not all(isinstance(v, str) and v in KINDS for v in kinds.values()):
            raise CorruptFileError(f"{where}: quantization spec has an unknown scheme or kind; re-export the folder")
        return cls(scheme=data["scheme"], kinds=dict(kinds), keep_float=tuple(data.get("keep_float", KEEP_FLOAT)),
                   calibration=data.get("calibration"), gates=dict(data.get("gates") or {}))


def make_spec(scheme: str, components: tuple[str, ...]) -> QuantSpec:
    """The spec of `scheme` for the exported `components`, with the scheme's gates recorded beside it."""
    s = get_scheme(scheme)
    return QuantSpec(scheme=s.name, kinds={c: s.kinds[c] for c in components}, gates=asdict(s.gates))

"""Model costs measured on the real modules: parameters, MACs per call, weight bytes per dtype.

MACs come from running each component once under torch's FLOP counter (on the meta device when
the weights are not materialised, so SD-scale models cost no memory) and halving the FLOPs.
Attention's score and value products are reported apart: published figures (e.g. SD1.5's
338.6 GMACs at 512²) count only the layers with weights, convolutions and linears.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .bundle import Bundle
from .sampler import latent_shape
from .vae import decoder_modules

_BYTES = {"float32": 4, "float16": 2, "int8": 1}
# Ops that multiply by weights; everything else the counter sees (bmm, baddbmm, SDPA) is attention.
_WEIGHT_OPS = {"convolution", "mm", "addmm", "linear", "_convolution", "conv2d"}


@dataclass
class ComponentCost:
    """What one call of one component costs."""

    component: str
    params: int
    macs: int  # every multiply-accumulate, attention score and value products included
    attention_macs: int  # the part spent in attention's QK^T and AV products (no weights)
    input_shapes: dict[str, list[int]]
    weight_bytes: dict[str, int]  # stored dtype -> bytes, as the module holds them
    bytes_at: dict[str, int]  # size if all weights were stored at each deployment dtype

    @property
    def weight_macs(self) -> int:
        """MACs of the layers with weights (convolutions, linears)."""
        return self.macs - self.attention_macs

    def as_dict(self) -> dict:
        return {**asdict(self), "weight_macs": self.weight_macs}


def _example_inputs(bundle: Bundle, name: str, hw: tuple[int, int], batch: int, device: torch.device) -> dict:
    unet = bundle.unet
    if name == "unet":
        inputs = {"sample": torch.zeros(batch, unet.config.in_channels, *hw, device=device),
                  "timestep": torch.tensor([999] * batch, device=device),
                  "encoder_hidden_states": torch.zeros(batch, 77, unet.config.cross_attention_dim, device=device)}
        if unet.config.addition_embed_type == "text_time":
            text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, text_dim, device=device),
                                           "time_ids": torch.zeros(batch, 6, device=device)}
        return inputs
    if name == "vae_decoder":
        return {"z": torch.zeros(batch, bundle.vae.config.latent_channels, *hw, device=device)}
    if name == "text_encoder":
        return {"input_ids": torch.zeros(batch, 77, dtype=torch.long, device=device)}
    raise KeyError(name)


def _callables(bundle: Bundle) -> dict[str, tuple[torch.nn.Module, object]]:
    calls: dict[str, tuple[torch.nn.Module, object]] = {"unet": (bundle.unet, bundle.unet)}
    calls["vae_decoder"] = (bundle.vae, lambda z: bundle.vae.decode(z))  # positional: Tiny names it x, KL z
    if bundle.text_encoder is not None:
        calls = {"text_encoder": (bundle.text_encoder, bundle.text_encoder), **calls}
    return calls


def _weight_bytes(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> dict[str, int]:
    c: Counter[str] = Counter()
    for p in params:
        c[str(p.dtype).removeprefix("torch.")] += p.numel() * p.element_size()
    return dict(c)


@torch.no_grad()
def measure_costs(bundle: Bundle, resolution: int | None = None, batch: int = 1) -> list[ComponentCost]:
    """Parameters, MACs per call and weight sizes of each component at `resolution` pixels."""
    hw = latent_shape(bundle, resolution, resolution)
    out = []
    for name, (module, fn) in _callables(bundle).items():
        parts = decoder_modules(module) if name == "vae_decoder" else [module]
        params = [p for part in parts for p in part.parameters()]
        device = next(module.parameters()).device
        inputs = _example_inputs(bundle, name, hw, batch, device)
        counter = FlopCounterMode(display=False)
        # The counter has no formula for the fused CPU attention kernel (it would count zero MACs);
        # the math kernel is the same products as matmuls it counts, on every device.
        with sdpa_kernel(SDPBackend.MATH), counter:
            fn(**inputs)
        n = sum(p.numel() for p in params)
        shapes = {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        attention = sum(flops for op, flops in counter.get_flop_counts()["Global"].items()
                        if str(op).removeprefix("aten.") not in _WEIGHT_OPS)
        out.append(ComponentCost(component=name, params=n, macs=counter.get_total_flops() // 2,
                                 attention_macs=attention // 2,
                                 input_shapes=shapes, weight_bytes=_weight_bytes(module, params),
                                 bytes_at={k: n * b for k, b in _BYTES.items()}))
    return out

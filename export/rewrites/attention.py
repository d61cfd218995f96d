"""Attention forms, and the one place that decides which form each backend gets (`choose_form`).

Forms (every one computes softmax(Q K^T * scale) V per head; they differ only in the graph they trace to):
    ort_mha        one com.microsoft::MultiHeadAttention node per attention (onnxruntime; its CPU kernel
                   tiles the product, so the [S, L] attention matrix is never written to memory)
    sdpa           torch scaled_dot_product_attention (Core ML iOS18, traced through `default_scale_sdpa`
                   so that coremltools lowers it to its scaled_dot_product_attention op)
    split_einsum   per-head einsums in the [B, C, 1, S] layout of Apple's ml-stable-diffusion, the form
                   the Neural Engine runs well (Core ML iOS16/17, which have no fused op)
    softmax        explicit batched matmuls around a single Softmax op: the partially fused form for
                   backends with no attention op (ExecuTorch: torch SDPA decomposes with NaN-guard ops
                   that XNNPACK does not take)

Diffusers' `Attention` modules are switched to the chosen form with `attention_form(module, form)`,
which restores the original processors afterwards, so exporting never changes the Bundle. Counting the
fused ops an artifact holds is the backend's job (`export.onnx.count_onnx_fused`,
`export.coreml.count_coreml_fused`); `intended_fused_count` says how many there should be.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from ...errors import ConfigError, UnsupportedOpError

FORMS = ("ort_mha", "sdpa", "split_einsum", "softmax")
# (q, k, v, heads, scale) -> attention output: what a form computes inside the processor.
Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def choose_form(backend: str, deployment_target: str | None = None) -> str:
    """The attention form for a backend ("onnx", "coreml", "executorch", or "generic")."""
    if backend == "onnx":
        return "ort_mha"
    if backend == "executorch":
        return "softmax"
    if backend == "coreml":
        target = (deployment_target or "iOS18").lower()
        if target not in ("ios16", "ios17", "ios18"):
            raise ConfigError(f"unknown Core ML deployment target {deployment_target!r}; choose iOS16, iOS17 or iOS18")
        return "sdpa" if target == "ios18" else "split_einsum"
    if backend == "generic":
        return "softmax"
    raise ConfigError(f"no attention form for backend {backend!r}")


class _OrtMultiHeadAttention(torch.autograd.Function):
    """SDPA in PyTorch; one com.microsoft::MultiHeadAttention node in a (TorchScript-path) ONNX export."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        return _sdpa(q, k, v, heads, scale)

    @staticmethod
    def symbolic(g: Any, q: Any, k: Any, v: Any, heads: int, scale: float) -> Any:
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads, scale_f=scale)
        out.setType(q.type())
        return out


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, d = x.shape
    return x.view(b, s, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    return _merge(F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), scale=scale))


def _softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    weights = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)
    return _merge(torch.matmul(weights, vh))


def _split_einsum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    # Apple ml-stable-diffusion's layout: channels first, [B, C, 1, S], one einsum pair per head.
    qc, kc, vc = (x.transpose(1, 2).unsqueeze(2) for x in (q, k, v))
    dh = q.shape[-1] // heads
    outs = []
    for i in range(heads):
        sl = slice(i * dh, (i + 1) * dh)
        w = torch.einsum("bchq,bkhc->bkhq", qc[:, sl], kc[:, sl].transpose(1, 3)) * scale
        w = w.softmax(dim=1)
        outs.append(torch.einsum("bkhq,bchk->bchq", w, vc[:, sl]))
    return torch.cat(outs, dim=1).squeeze(2).transpose(1, 2)


def _ort_mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    return _OrtMultiHeadAttention.apply(q, k, v, heads, scale)


def default_scale_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """The sdpa form with the default scale (query pre-scaled): coremltools fuses torch SDPA into Core ML's
    iOS18 scaled_dot_product_attention op only when no explicit scale is passed."""
    b, s, d = q.shape
    dh = d // heads
    q = q * (scale * math.sqrt(dh)) if not math.isclose(scale, 1 / math.sqrt(dh), rel_tol=1e-6) else q
    qh, kh, vh = (x.view(x.shape[0], x.shape[1], heads, dh).transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, s, d)


_CORES: dict[str, Core] = {"ort_mha": _ort_mha, "sdpa": _sdpa, "split_einsum": _split_einsum, "softmax": _softmax}


class FormProcessor:
    """A diffusers attention processor computing attention in one of `FORMS` (mirrors AttnProcessor).

    `core`, when given, computes the form in place of its default (e.g. `default_scale_sdpa` for "sdpa").
    """

    def __init__(self, form: str, path: str = "", used: set[str] | None = None, core: Core | None = None):
        if form not in FORMS:
            raise ConfigError(f"unknown attention form {form!r}; choose from {', '.join(FORMS)}")
        self.form, self.path, self.core = form, path, core or _CORES[form]
        self.used = used if used is not None else set()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if attention_mask is not None:
            raise UnsupportedOpError(f"attention with a mask (module {self.path}) has no {self.form} form")
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise UnsupportedOpError(f"attention with q/k normalisation (module {self.path}) has no {self.form} form")
        self.used.add(self.path)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        hidden_states = self.core(query, key, value, attn.heads, float(attn.scale))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if four_d:
            hidden_states = hidden_states.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_modules(module: nn.Module) -> list[tuple[str, Attention]]:
    """Every diffusers Attention module inside `module`, with its path."""
    return [(p, m) for p, m in module.named_modules() if isinstance(m, Attention)]


@contextmanager
def attention_form(module: nn.Module, form: str, used: set[str] | None = None,
                   core: Core | None = None) -> Iterator[int]:
    """Switch every diffusers Attention in `module` to `form`; yields how many were switched; restores on exit.

    `used`, when given, collects the paths of the attention modules that actually run while switched
    (what an export of the traced forward should contain: a VAE wrapper runs only its decoder's).
    `core`, when given, computes the form in place of its default (see `FormProcessor`).
    """
    mods = attention_modules(module)
    saved = [(m, m.processor) for _, m in mods]
    try:
        for path, m in mods:
            m.set_processor(FormProcessor(form, path, used, core))
        yield len(mods)
    finally:
        for m, proc in saved:
            m.set_processor(proc)


def intended_fused_count(used: set[str], form: str) -> int:
    """How many fused attention ops an export should contain, given the attention modules that ran."""
    return len(used) if form in ("ort_mha", "sdpa") else 0

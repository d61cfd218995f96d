"""Winograd F(2x2,3x3) / F(4x4,3x3) as a torch module swap, for ExecuTorch / XNNPACK (the ExecuTorch exporter uses it).

The transforms and the per-layer choice (`choose_m`, from the measured table) are in `winograd.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from .winograd import choose_m, input_transform_kernel, output_transform, transform_weights


class WinogradConv2d(torch.nn.Module):
    """A 3x3 stride-1 pad-1 Conv2d computed in Winograd form, in torch ops (torch.export-able).

    The same algorithm as the ONNX rewrite, in aten ops an ExecuTorch/XNNPACK lowering understands:
    conv2d (input transform), permute, bmm (main product), matmul (output transform), pixel_shuffle.
    It keeps the permute layout rather than the ONNX rewrite's tall-image one: lowered through XNNPACK,
    the tall form (conv2d, matmul, conv_transpose2d) took 81.8 ms against this form's 38.0 ms on a
    320x320@64x64 F4 layer (this 2-core host, 2026-11-26).
    """

    def __init__(self, conv: torch.nn.Conv2d, m: int):
        super().__init__()
        w = conv.weight.detach().double().numpy()
        self.m, self.k = m, w.shape[0]
        dtype = conv.weight.dtype
        self.register_buffer("u", torch.from_numpy(transform_weights(w, m)).to(dtype))
        self.register_buffer("bt", torch.from_numpy(input_transform_kernel(m)).to(dtype))
        self.register_buffer("at", torch.from_numpy(output_transform(m)).to(dtype))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        m, a, k = self.m, self.m + 2, self.k
        th, tw = (h + m - 1) // m, (w + m - 1) // m
        xp = torch.nn.functional.pad(x, (1, tw * m - w + 1, 1, th * m - h + 1))
        v = torch.nn.functional.conv2d(xp.reshape(n * c, 1, th * m + 2, tw * m + 2), self.bt, stride=m)
        v = v.reshape(n, c, a * a, th * tw).permute(2, 1, 0, 3).reshape(a * a, c, n * th * tw)
        prod = torch.bmm(self.u, v)  # [a^2, K, N*T]
        y = torch.matmul(self.at, prod.reshape(a * a, k * n * th * tw))  # [m^2, K*N*T]
        # -> [N, K*m*m, th, tw] with channel k*m*m + r*m + s: pixel_shuffle's order.
        y = y.reshape(m * m, k, n, th * tw).permute(2, 1, 0, 3).reshape(n, k * m * m, th, tw)
        y = torch.nn.functional.pixel_shuffle(y, m)[:, :, :h, :w]
        return y if self.bias is None else y + self.bias.view(1, k, 1, 1)


def eligible_module(sub: torch.nn.Module) -> bool:
    """A 3x3, stride-1, dilation-1, zero-pad-1, single-group Conv2d (the module twin of `winograd_onnx.eligible`)."""
    return (isinstance(sub, torch.nn.Conv2d) and tuple(sub.kernel_size) == (3, 3) and tuple(sub.stride) == (1, 1)
            and tuple(sub.dilation) == (1, 1) and sub.groups == 1 and tuple(sub.padding) == (1, 1)
            and sub.padding_mode == "zeros")


def swap_winograd_modules(module: torch.nn.Module, backend: str, mode: str,
                          spatial: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Replace, in place, every 3x3 stride-1 pad-1 Conv2d of `module` that the table for `backend` (or a
    forced mode) picks with a `WinogradConv2d`; `spatial` maps module paths to input (height, width), as
    `conv_input_sizes` gives them. Returns {"mode", "rewritten": {module path: m}, "eligible": n}."""
    if mode == "off":
        return {"mode": mode, "rewritten": {}, "eligible": 0}
    rewritten: dict[str, int] = {}
    n_eligible = 0
    for path, sub in list(module.named_modules()):
        if not eligible_module(sub):
            continue
        n_eligible += 1
        h, w = spatial.get(path, (0, 0))
        m = choose_m(backend, sub.in_channels, sub.out_channels, h, w, mode) if (h or mode != "auto") else None
        if m is None:
            continue
        parent_path, _, name = path.rpartition(".")
        setattr(module.get_submodule(parent_path) if parent_path else module, name, WinogradConv2d(sub, m))
        rewritten[path] = m
    return {"mode": mode, "rewritten": rewritten, "eligible": n_eligible}

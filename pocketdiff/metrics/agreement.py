"""Agreement between two sets of images or tensors: PSNR, SSIM, and parity figures."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch (inf when identical)."""
    mse = F.mse_loss(a.double(), b.double()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(data_range ** 2 / mse)).item()


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) of images [N, C, H, W]."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    g = _gaussian()
    window = (g[:, None] * g[None, :]).expand(c, 1, -1, -1).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def parity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Max abs error, relative L2 error and cosine similarity of a candidate against a reference."""
    r, c = reference.double().flatten(), candidate.double().flatten()
    return {"max_abs": float((r - c).abs().max()),
            "rel_l2": float((r - c).norm() / r.norm().clamp_min(1e-30)),
            "cosine": float(F.cosine_similarity(r, c, dim=0))}

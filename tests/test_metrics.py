"""Metric code on inputs with known answers, and the shipped teacher and classifier."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from pocketdiff.data import load_fashion_mnist
from pocketdiff.metrics.agreement import psnr, ssim
from pocketdiff.metrics.classifier import load_classifier, prompt_accuracy
from pocketdiff.metrics.fid import fid_from_features, kid, knn_radii, precision_recall
from pocketdiff.sampler import SampleConfig, generate
from pocketdiff.zoo import load_fashion


def test_fid_and_kid_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 16))
    b = rng.normal(loc=1.0, size=(2000, 16))
    assert abs(fid_from_features(a, a)) < 1e-6
    assert abs(fid_from_features(a, b) - 16.0) < 1.0  # |mu difference|^2 = 16
    # the covariance term equals pytorch-fid's scipy sqrtm form on non-commuting covariances
    c = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
    sa, sc = np.cov(a, rowvar=False), np.cov(c, rowvar=False)
    reference = np.trace(sa) + np.trace(sc) - 2 * np.trace(scipy.linalg.sqrtm(sa @ sc).real)
    mean_term = np.sum((a.mean(0) - c.mean(0)) ** 2)
    assert abs(fid_from_features(a, c) - mean_term - reference) < 1e-9 * abs(reference)
    assert kid(a, b, subsets=5, subset_size=500)[0] > 10 * abs(kid(a, a[::-1].copy(), subsets=5, subset_size=500)[0])


def test_psnr_ssim():
    x = torch.rand(2, 3, 32, 32)
    assert psnr(x, x) == float("inf") and abs(ssim(x, x) - 1) < 1e-9
    assert 19 < psnr(x, (x + 0.1).clamp(0, 1)) < 22


def test_classifier_accuracy_on_real_test_batch():
    x, y = load_fashion_mnist("test")
    acc = prompt_accuracy(load_classifier(), torch.from_numpy(x[:2000] / 255.0).float().unsqueeze(1), y[:2000])
    assert acc > 0.91


def test_shipped_teacher_generates_on_cpu():
    bundle = load_fashion()
    img = generate(bundle, ["a photo of a sneaker"], SampleConfig(steps=4, guidance_scale=4.0), progress=False)
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all() and img.std() > 0.05


def test_eval_cli_reports_fid_floor_and_labels_quick_checks(tmp_path):
    env = {**os.environ, "POCKETDIFF_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "pocketdiff", "eval", "--samples", "4", "--steps", "2",
                          "--reference-samples", "8", "--json"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["samples"] == 4 and r["reference_samples"] == 8 and r["quick_check"] is True
    assert r["fid"] > 0 and r["floor"]["samples"] == 4 and 0 <= r["prompt_accuracy"] <= 1


def test_precision_recall_separates_fidelity_from_diversity():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 8))
    same = rng.normal(size=(600, 8))
    collapsed = real[:20] + rng.normal(scale=1e-3, size=(20, 8))  # a few modes, copied closely
    far = rng.normal(loc=20.0, size=(600, 8))
    p, r = precision_recall(real, same)
    assert p > 0.8 and r > 0.8
    p, r = precision_recall(real, np.repeat(collapsed, 30, axis=0))
    assert p == 1.0 and r < 0.2  # every sample is real-looking, most of the real set is missed
    assert precision_recall(real, far) == (0.0, 0.0)
    assert precision_recall(real, same, real_radii=knn_radii(real)) == precision_recall(real, same)
    with pytest.raises(ValueError, match="more than 3 features"):
        precision_recall(real, same[:3])

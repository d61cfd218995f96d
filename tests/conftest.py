"""Shared fixtures: the library stays offline, and one tiny random-weight pipeline per test module."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    """arch:tiny with fixed random weights: the SD topology at a size the 2-core CI host exports in seconds."""
    from pocketdiff.zoo import build_arch

    return build_arch("tiny", seed=3)

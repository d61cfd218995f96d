"""Shared fixtures: the library stays offline, one tiny random-weight pipeline per test module, and the quantization
tests' model, calibration set and one-thread setting."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    """arch:tiny with fixed random weights: the SD topology at a size the 2-core CI host exports in seconds."""
    from pocketdiff.zoo import build_arch

    return build_arch("tiny", seed=3)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on the shared 2-core
    host, spinning thread pools make heavy runs many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_bundle():
    """arch:tiny seed 0, the model `pocketdiff export arch:tiny` builds."""
    from pocketdiff.zoo import build_arch

    return build_arch("tiny", seed=0)


@pytest.fixture(scope="module")
def calibration(tiny_bundle):
    """The calibration set recorded along tiny_bundle's validation sampler (what a quantized export calibrates on)."""
    from pocketdiff.compress.quantize.calibration import record_calibration
    from pocketdiff.runtimes.harness import FALLBACK
    from pocketdiff.sampler import SampleConfig

    return record_calibration(tiny_bundle, SampleConfig.for_bundle(tiny_bundle, fallback=FALLBACK))

"""Device estimates: the calibration predicts the published figures within its stated error, the roofline and
the memory fit behave as their formulas say, and an unknown device is a user error."""

import dataclasses

import pytest

from pocketdiff.costs import measure_costs
from pocketdiff.errors import ConfigError
from pocketdiff.runtimes.estimates import (Load, calibrate, component_loads, devices, estimate, get_devices,
                                           memory_fit, roofline_ms)


@pytest.fixture(scope="module")
def calibration():
    return calibrate()


def test_held_out_predictions_stay_within_the_stated_error(calibration):
    npu = calibration["kinds"]["npu"]
    assert npu["points"] >= 3 and npu["max_abs_error_pct"] < 20  # ANCHORS: pipelines reach ~20 % of peak alike
    for p in calibration["points"]:
        if p["kind"] != "npu":
            continue
        assert abs(p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"] * 100 <= npu["max_abs_error_pct"] + 1e-9
        # the fit on every point predicts each one at least as well as the worst held-out prediction
        assert abs(p["fitted_ms"] - p["measured_ms"]) / p["measured_ms"] * 100 <= npu["max_abs_error_pct"]
    assert 0.1 < npu["efficiency"] < 0.5


def test_a_kind_with_one_point_claims_no_held_out_error(calibration):
    gpu = calibration["kinds"]["gpu"]
    (point,) = [p for p in calibration["points"] if p["kind"] == "gpu"]
    assert gpu["points"] == 1 and gpu["max_abs_error_pct"] is None and point["predicted_ms"] is None
    assert point["fitted_ms"] == pytest.approx(point["measured_ms"])


def test_roofline_takes_the_slower_of_compute_and_memory():
    d = devices()["sd8gen3-hexagon"]
    compute_bound = Load(macs=10**12, params=1, activation_elems=0, io_elems=0, peak_op_elems=0)
    assert roofline_ms(d, compute_bound, 0.5) == pytest.approx(1000 * 2e12 / (d.peak_tops * 1e12) / 0.5)
    memory_bound = Load(macs=1, params=10**9, activation_elems=0, io_elems=0, peak_op_elems=0)
    assert roofline_ms(d, memory_bound, 0.5) == pytest.approx(1000 * 1e9 * d.weight_bytes / (d.bandwidth_gbs * 1e9) / 0.5)


def test_memory_fit_compares_weights_and_working_set_with_the_app_budget():
    d = devices()["midrange-gpu"]
    load = Load(macs=1, params=10**9, activation_elems=0, io_elems=0, peak_op_elems=10**8)
    fit = memory_fit(d, {"unet": load})
    assert fit["needed_mb"] == pytest.approx((1e9 * d.weight_bytes + 1e8 * d.activation_bytes) / 1e6)
    assert fit["fits"] == (fit["needed_mb"] <= fit["budget_mb"])
    small = dataclasses.replace(d, ram_gb=1)
    assert memory_fit(small, {"unet": load})["fits"] is False


def test_loads_count_the_real_modules(tiny_bundle, calibration):
    loads = component_loads(tiny_bundle, {"unet": 2, "vae_decoder": 1})
    costs = {c.component: c for c in measure_costs(tiny_bundle, None, 2)}
    assert loads["unet"].macs == costs["unet"].macs and loads["unet"].params == costs["unet"].params
    for load in loads.values():
        assert load.activation_elems > load.io_elems > 0 and load.peak_op_elems > 0
    rows = estimate(loads, {"unet": 4, "vae_decoder": 1}, get_devices(["a17pro-ane"]), calibration)
    (row,) = rows
    assert row["estimate"] is True and row["image_ms"] == pytest.approx(4 * row["components_ms"]["unet"]
                                                                      + row["components_ms"]["vae_decoder"])


def test_unknown_device_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown device 'pixel'.*a17pro-ane"):
        get_devices(["pixel"])
    assert len(get_devices(None)) == len(devices()) >= 5

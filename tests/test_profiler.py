"""The side-by-side latency profiler (call order, what is timed) and `pocketdiff profile` on a tiny export."""

import json
import shutil

import pytest

from pocketdiff import cli
from pocketdiff.export.base import ArtifactSet, ExportOptions, export_bundle
from pocketdiff.runtimes.estimates import devices
from pocketdiff.runtimes.profiler import LatencyStats, compare_latency, speedup


class FakeClock:
    """A clock that only moves when a fake runner 'works'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_blocks_rotate_and_the_first_call_of_each_block_is_untimed():
    clock, calls = FakeClock(), []
    cost = {"a": 2.0, "b": 1.0, "c": 0.5}

    def runner(name):
        def run():
            calls.append(name)
            # The untimed first call of a block is slow (a cold cache, the last runner's threads still spinning).
            clock.now += cost[name] * (10 if len(calls) == 1 or calls[-2] != name else 1)
        return run

    stats = compare_latency({n: runner(n) for n in cost}, blocks=3, per_block=2, clock=clock)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["b"] * 3 + ["c"] * 3 + ["a"] * 3 + ["c"] * 3 + ["a"] * 3 + ["b"] * 3
    assert {n: s.times_s for n, s in stats.items()} == {n: [c] * 6 for n, c in cost.items()}
    assert speedup(stats, "a", "c") == pytest.approx(4.0)
    assert stats["b"].as_dict() == {"median_s": 1.0, "p90_s": 1.0, "min_s": 1.0, "max_s": 1.0, "calls": 6}


def test_nothing_to_time_is_an_error():
    with pytest.raises(ValueError):
        compare_latency({}, blocks=1, per_block=1)
    with pytest.raises(ValueError):
        compare_latency({"a": lambda: None}, blocks=1, per_block=0)


def test_p90_is_the_nearest_rank_value():
    stats = LatencyStats("a", [float(t) for t in range(1, 21)])
    assert stats.p90_s == 18.0 and stats.median_s == 10.5


# --- `pocketdiff profile` on a tiny export ------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_export(tiny_bundle, tmp_path_factory):
    """arch:tiny (seed 0, what the manifest's model rebuilds) on ONNX: every component the image needs."""
    out = tmp_path_factory.mktemp("prof") / "tiny"
    export_bundle(tiny_bundle, "arch:tiny", ["onnx"],
                  ExportOptions(components=("text_encoder", "unet", "vae_decoder")), out)
    return out


@pytest.fixture(scope="module")
def self_profile(tiny_export, tmp_path_factory):
    """`pocketdiff profile TINY --against TINY`: (exit code, the JSON report)."""
    report = tmp_path_factory.mktemp("prof") / "p.json"
    code = cli.main(["profile", str(tiny_export), "--against", str(tiny_export), "--blocks", "3", "--per-block", "3",
                     "--report", str(report)])
    return code, json.loads(report.read_text())


def test_profile_reports_latency_memory_operators_and_costs(self_profile):
    code, result = self_profile
    assert code == 0
    onnx = result["profiles"]["A"]["targets"]["onnx"]
    assert set(onnx["components"]) == {"text_encoder", "unet", "vae_decoder"}
    for comp, c in onnx["components"].items():
        assert 0 < c["median_ms"] <= c["p90_ms"] and c["timed_calls"] == 9
        assert c["macs"] > 0 and c["weight_bytes"] > 0 and c["bytes_unfused"] > c["bytes_min"] > c["weight_bytes"]
        assert c["achieved_gmacs_per_s"] == pytest.approx(c["macs"] / c["median_ms"] * 1e3 / 1e9)
        ops = onnx["operators"][comp]
        assert ops["ops"] and all(o["ms"] >= 0 for o in ops["ops"]) and 0.2 < sum(o["share"] for o in ops["ops"]) <= 1.0001
    assert onnx["components"]["unet"]["batch"] == 2  # the built-in fallback sampler is guided: cond + uncond
    image = onnx["image"]
    assert image["median_ms"] > onnx["components"]["unet"]["median_ms"] * image["calls"]["unet"] * 0.5
    assert image["calls"] == {"text_encoder": 2, "unet": 8, "vae_decoder": 1}
    memory = onnx["memory"]
    assert memory["peak_rss_mb"] >= memory["rss_after_load_mb"] >= memory["rss_after_imports_mb"] > 50
    peak = result["host_matmul_peak"]["onnx"]
    assert peak["gmacs_per_s"] == max(peak["by_library_gmacs_per_s"].values()) > 1
    estimates = result["profiles"]["A"]["estimates"]
    assert {e["device"] for e in estimates} == set(devices()) and all(e["estimate"] and e["image_ms"] > 0
                                                                      for e in estimates)


def test_against_itself_gives_ratios_near_one_that_match_the_medians(self_profile):
    _, result = self_profile
    ratios = result["against"]["targets"]["onnx"]
    a, b = (result["profiles"][k]["targets"]["onnx"] for k in "AB")
    for comp, r in ratios.items():
        want = a["image"]["median_ms"] / b["image"]["median_ms"] if comp == "image" else \
            a["components"][comp]["median_ms"] / b["components"][comp]["median_ms"]
        assert r == pytest.approx(want)
    # the same folder on both sides: about 1, within the spread this shared 2-core host shows (docs/BENCHMARKS.md)
    assert 0.5 < ratios["image"] < 2.0 and 0.4 < ratios["unet"] < 2.5


def _bad(argv, tmp_path, capsys):
    """Run `pocketdiff profile ...`; (exit code, stderr) and whether anything was written."""
    report = tmp_path / "r.json"
    code = cli.main(["profile", *map(str, argv), "--report", str(report)])
    return code, capsys.readouterr().err, report.exists()


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_export, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    code, err, wrote = _bad([tmp_path / "plain"], tmp_path, capsys)
    assert code == 2 and "not a pocketdiff artifact folder" in err and not wrote
    code, err, wrote = _bad([tiny_export, "--devices", "pixel-9000"], tmp_path, capsys)
    assert code == 2 and "unknown device 'pixel-9000'" in err and not wrote
    other = tmp_path / "other"
    shutil.copytree(tiny_export, other)
    aset = ArtifactSet.load(other)
    aset.artifacts = [a for a in aset.artifacts if a.component != "vae_decoder"]
    aset.save(other)
    code, err, wrote = _bad([tiny_export, "--against", other], tmp_path, capsys)
    assert code == 2 and "--against" in err and "vae_decoder" in err and not wrote
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_executorch_operators_come_from_etdump(tiny_bundle, tmp_path):
    """ETDump through the devtools Inspector: XNNPACK operators inside the delegate, the rest outside it."""
    from pocketdiff.export.components import example_inputs
    from pocketdiff.runtimes.operators import executorch_operators

    out = tmp_path / "et"
    aset = export_bundle(tiny_bundle, "arch:tiny", ["executorch"],
                         ExportOptions(components=("vae_decoder",), batch_sizes=(1,)), out)
    feeds = {k: v.numpy() for k, v in example_inputs(tiny_bundle, "vae_decoder", 1).items()}
    table = executorch_operators(aset.find("executorch", "vae_decoder"), out, feeds, calls=2)
    assert "ETDump" in table["source"] and table["calls"] == 2 and table["call_ms"] > 0
    names = [o["op"] for o in table["ops"]]
    assert any(n.startswith("xnnpack: Convolution") for n in names), names
    assert sum(o["ms"] for o in table["ops"]) <= table["call_ms"] * 1.05

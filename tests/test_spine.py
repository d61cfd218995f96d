"""Spine: costs against published SD1.5 figures, Bundle round trip, sampler determinism, bad input."""

import json

import pytest
import torch

from pocketdiff.bundle import Bundle
from pocketdiff.costs import measure_costs
from pocketdiff.errors import ConfigError, CorruptFileError, InputPathError, RecipeError, ShapeError
from pocketdiff.recipe import load_recipe
from pocketdiff.sampler import SampleConfig, generate
from pocketdiff.zoo import build_arch


def test_sd15_costs_match_published_figures():
    costs = {c.component: c for c in measure_costs(build_arch("sd15", device="meta"), 512)}
    assert abs(costs["unet"].params - 859.5e6) / 859.5e6 < 0.01
    assert abs(costs["unet"].weight_macs - 338.6e9) / 338.6e9 < 0.01
    assert abs(costs["vae_decoder"].params - 49.5e6) / 49.5e6 < 0.01
    assert abs(costs["vae_decoder"].weight_macs - 1240e9) / 1240e9 < 0.01


def test_costs_count_attention_on_cpu_as_on_meta():
    """CPU runs a fused attention kernel the FLOP counter has no formula for: it must still be counted."""
    on_cpu = {c.component: c for c in measure_costs(build_arch("tiny", seed=1), None)}
    on_meta = {c.component: c for c in measure_costs(build_arch("tiny", device="meta"), None)}
    assert on_cpu["unet"].attention_macs > 0
    assert {n: (c.macs, c.attention_macs) for n, c in on_cpu.items()} == \
        {n: (c.macs, c.attention_macs) for n, c in on_meta.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("b") / "tiny"
    build_arch("tiny", seed=1).save(path)
    return path


def test_bundle_round_trip_bit_identical(tiny, tmp_path):
    a = Bundle.load(tiny)
    a.save(tmp_path / "again")
    b = Bundle.load(tmp_path / "again")
    for name, module in a.modules().items():
        sa, sb = module.state_dict(), b.modules()[name].state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_same_images_and_batching_does_not_matter(tiny):
    b = Bundle.load(tiny)
    cfg = SampleConfig(steps=3, seed=7, batch_size=2)
    x = generate(b, ["a", "b", "c"], cfg, progress=False)
    y = generate(b, ["a", "b", "c"], SampleConfig(steps=3, seed=7, batch_size=3), progress=False)
    assert x.shape == (3, 3, 16, 16)
    assert torch.equal(x, generate(b, ["a", "b", "c"], cfg, progress=False))  # same command, same bits
    assert torch.allclose(x, y, atol=1e-4)  # batching changes only GEMM rounding
    assert not torch.equal(x, generate(b, ["a", "b", "c"], SampleConfig(steps=3, seed=8), progress=False))


@pytest.mark.parametrize("sched", ["ddim", "dpmsolver++", "euler", "lcm"])
def test_schedulers_run(tiny, sched):
    b = Bundle.load(tiny)
    x = generate(b, ["x"], SampleConfig(steps=2, scheduler=sched), progress=False)
    assert torch.isfinite(x).all()


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(InputPathError):
        Bundle.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputPathError):
        Bundle.load(tmp_path / "empty")
    broken = tmp_path / "broken"
    Bundle.load(tiny).save(broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptFileError):
        Bundle.load(broken)
    wrong = tmp_path / "wrong"
    Bundle.load(tiny).save(wrong)
    cfg = json.loads((wrong / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [64, 128]
    (wrong / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError):
        Bundle.load(wrong)
    with pytest.raises(ShapeError):
        generate(Bundle.load(tiny), ["x"], SampleConfig(steps=1, height=18, width=18), progress=False)


def test_recipe_rejects_unknown_pass_and_setting(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text('[[pass]]\nname = "nope"\n')
    with pytest.raises(RecipeError, match="unknown pass"):
        load_recipe(r)
    r.write_text('[[pass]]\nname = "cast"\ncolour = 1\n')
    with pytest.raises(RecipeError, match="no setting"):
        load_recipe(r)


def test_recipe_overrides_set_typed_settings_by_pass_name_or_number():
    r = load_recipe("fashion-1step", ["dmd.gan_weight=0", "dmd.iterations=37", "2.dtype=bfloat16"])
    assert r.stages[0].settings.gan_weight == 0.0 and r.stages[0].settings.iterations == 37
    assert r.stages[1].settings.dtype == "bfloat16"
    assert load_recipe("fashion-1step").stages[0].settings.iterations != 37  # the file is untouched
    for bad, match in [("dmd.critic_updates=0", "critic_updates"), ("dmd.gan_weight=-1", "gan_weight"),
                       ("cast.colour=1", "no setting"), ("nope.x=1", "no pass 'nope'"), ("gan_weight=0", "PASS.KEY"),
                       ("9.x=1", "no pass '9'"), ("dmd.name=cast", "name cannot")]:
        with pytest.raises(RecipeError, match=match):
            load_recipe("fashion-1step", [bad])
    with pytest.raises(RecipeError, match="2 pass 'cast'"):
        load_recipe("fashion-4step", ["cast.dtype=float32"])


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from pocketdiff.cli import main

    code = main(["info", str(tmp_path / "nope")])  # the `main` of `python -m pocketdiff`, in this process
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().startswith("pocketdiff: error:") and "Traceback" not in err

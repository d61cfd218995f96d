"""Slimming on tiny configs: block removal (BK-SDM presets and explicit lists), the light VAE decoder and
recovery each yield a model that runs, saves, reloads, exports to ONNX and matches PyTorch there;
recovery's loss falls on a fixed probe batch; bad input is refused at the CLI with exit 2."""

import warnings
from pathlib import Path

import diffusers
import numpy as np
import onnx
import pytest
import torch

from pocketdiff import cli
from pocketdiff.bundle import Bundle
from pocketdiff.compress.slim.blocks import (BlockRemovalPass, build_student, count_params, plan_removal,
                                             preset_removals)
from pocketdiff.compress.slim.decoder import LightDecoderPass, build_light_decoder
from pocketdiff.compress.slim.recovery import FeatureTaps, RecoveryPass, build_recovery
from pocketdiff.errors import ConfigError
from pocketdiff.export.base import ArtifactSet, ExportOptions, export_bundle
from pocketdiff.export.components import example_inputs, wrap
from pocketdiff.recipe import load_recipe
from pocketdiff.runner import RunOptions, run_recipe
from pocketdiff.runtimes.base import open_session
from pocketdiff.zoo import build_arch

DEEP_UNET = {"in_channels": 4, "out_channels": 4, "layers_per_block": 2, "sample_size": 8,
             "block_out_channels": [16, 32, 32],
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8}


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory) -> Path:
    """arch:tiny with an SD-shaped U-Net (three stages, two pairs each, a mid-block), saved: every preset fits."""
    bundle = build_arch("tiny", seed=3)
    torch.manual_seed(0)
    bundle.unet = diffusers.UNet2DConditionModel(**DEEP_UNET).eval()
    folder = tmp_path_factory.mktemp("teacher") / "deep"
    bundle.save(folder)
    return folder


@pytest.fixture(scope="module")
def slim_run(deep_teacher, tmp_path_factory) -> Path:
    """One recipe through all three passes: remove-blocks tiny, 12 recovery steps, 3 light-decoder steps."""
    recipe = tmp_path_factory.mktemp("recipe") / "slim.toml"
    recipe.write_text(f'''model = "{deep_teacher}"
[[pass]]
name = "remove-blocks"
preset = "tiny"
[[pass]]
name = "recover"
iterations = 12
batch_size = 4
data_limit = 16
lr = 1e-3
warmup = 0
log_every = 1
[[pass]]
name = "light-decoder"
width = 8
iterations = 3
batch_size = 4
data_limit = 16
adv_start = 1
''')
    run = recipe.parent / "run"
    summary = run_recipe(load_recipe(recipe), run, options=RunOptions(progress=False))
    assert summary["finished"]
    return run


def _onnx_matches_torch(bundle: Bundle, components: tuple[str, ...], out: Path) -> ArtifactSet:
    """Export `components` to ONNX and check each against the PyTorch module on seeded inputs."""
    aset = export_bundle(bundle, "slim", ["onnx"], ExportOptions(components=components, batch_sizes=(1,)), out)
    for component in components:
        session = open_session(aset.find("onnx", component), out)
        feeds = example_inputs(bundle, component, 1)
        got = session.run({k: v.numpy() for k, v in feeds.items()})
        with torch.no_grad():
            want = wrap(bundle, component).module(**feeds).numpy()
        got = next(iter(got.values()))
        assert got.shape == want.shape and np.isfinite(got).all()
        assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()), component
    return aset


@pytest.mark.parametrize("preset", ["base", "small", "tiny"])
def test_preset_student_runs_saves_reloads_and_exports(deep_teacher, tmp_path, preset):
    teacher = Bundle.load(deep_teacher)
    plan = plan_removal(dict(teacher.unet.config), preset_removals(dict(teacher.unet.config), preset))
    student = build_student(teacher.unet, plan)
    assert count_params(student) < count_params(teacher.unet)
    assert (student.mid_block is None) == (preset != "base")
    assert len(student.down_blocks) == (2 if preset == "tiny" else 3)
    teacher.unet = student
    teacher.save(tmp_path / "s")
    again = Bundle.load(tmp_path / "s")
    assert isinstance(again.unet, diffusers.UNet2DConditionModel)
    feeds = example_inputs(again, "unet", 2)
    with torch.no_grad():
        assert torch.equal(wrap(again, "unet").module(**feeds), wrap(teacher, "unet").module(**feeds))
    _onnx_matches_torch(again, ("unet",), tmp_path / "onnx")


def test_student_starts_from_the_teachers_kept_pairs(deep_teacher):
    teacher = Bundle.load(deep_teacher).unet
    plan = plan_removal(dict(teacher.config), preset_removals(dict(teacher.config), "tiny"))
    student = build_student(teacher, plan).state_dict()
    t = teacher.state_dict()
    # up stage 0 of the 2-stage student is the teacher's up stage 1; its pair 1 is the teacher's last pair (2).
    assert torch.equal(student["up_blocks.0.resnets.1.conv1.weight"], t["up_blocks.1.resnets.2.conv1.weight"])
    assert torch.equal(student["down_blocks.1.attentions.0.proj_in.weight"], t["down_blocks.1.attentions.0.proj_in.weight"])
    assert torch.equal(student["conv_out.weight"], t["conv_out.weight"])


def test_explicit_list_equal_to_base_builds_the_base_student(deep_teacher):
    teacher = Bundle.load(deep_teacher).unet
    config = dict(teacher.config)
    explicit = ["down_blocks.0.resnets.1", "down_blocks.1.resnets.1", "down_blocks.2.resnets.1",
                "up_blocks.0.resnets.1", "up_blocks.1.resnets.1", "up_blocks.2.resnets.1"]
    a = build_student(teacher, plan_removal(config, explicit)).state_dict()
    b = build_student(teacher, plan_removal(config, preset_removals(config, "base"))).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Per-stage lists: only the first stage slimmed (layers_per_block becomes a list).
    one = plan_removal(config, ["down_blocks.0.resnets.1", "up_blocks.2.resnets.1"])
    assert one.config["layers_per_block"] == [1, 2, 2]
    assert build_student(teacher, one)(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 32)).sample.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("remove, message", [
    (["down_blocks.5.resnets.0"], "does not exist"),
    (["up_blocks.0.resnets.3"], "does not exist"),
    (["down_blocks.0.attentions.1"], "does not exist or is not removable"),
    (["down_blocks.0.resnets.1"], "one more pair in an up stage"),
    (["down_blocks.1"], "only the innermost stage"),
    (["down_blocks.0.resnets.0", "down_blocks.0.resnets.1", "up_blocks.2.resnets.0", "up_blocks.2.resnets.1"],
     "empties down_blocks.0"),
    (["down_blocks.0.resnets.0", "up_blocks.2.resnets.0"], "input changed width"),
])
def test_explicit_lists_that_do_not_fit_are_config_errors(deep_teacher, remove, message):
    teacher = Bundle.load(deep_teacher).unet
    with pytest.raises(ConfigError, match=message):
        build_student(teacher, plan_removal(dict(teacher.config), remove))


def test_presets_on_the_sd15_architecture_match_bk_sdm_sizes():
    """BK-SDM's published U-Net sizes (ANCHORS.md): 0.58 / 0.49 / 0.33 B for Base / Small / Tiny."""
    unet = build_arch("sd15", device="meta").unet
    for preset, billions in (("base", 0.58), ("small", 0.49), ("tiny", 0.33)):
        config = plan_removal(dict(unet.config), preset_removals(dict(unet.config), preset)).config
        with torch.device("meta"):
            student = diffusers.UNet2DConditionModel.from_config(config)
        assert abs(count_params(student) / 1e9 - billions) < 0.015, preset


def test_recovery_loss_falls_on_a_fixed_probe_batch(deep_teacher, tmp_path):
    teacher = Bundle.load(deep_teacher)
    student = Bundle.load(deep_teacher)
    plan = plan_removal(dict(student.unet.config), preset_removals(dict(student.unet.config), "tiny"))
    student.unet = build_student(student.unet, plan)
    settings = RecoveryPass.Settings(iterations=15, batch_size=8, data_limit=16, lr=2e-3, warmup=0)
    run = build_recovery(teacher, student, settings, tmp_path, torch.device("cpu"), progress=False)
    probe = run.draw(torch.Generator().manual_seed(1234))
    model = run.trainer.modules["recovery"]
    with torch.no_grad():
        before = run.losses(model, probe)
    assert before.feature > 0 and before.output > 0
    assert run.trainer.fit(run.step)
    with torch.no_grad():
        after = run.losses(model, probe)
    assert float(after.total) < 0.8 * float(before.total), (float(before.total), float(after.total))


def test_feature_taps_find_blocks_through_a_ddp_style_wrapper(deep_teacher):
    unet = Bundle.load(deep_teacher).unet

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from outside: `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = Wrapper(unet)
    names = [n for n, _ in wrapped.named_modules() if n.count(".") == 2 and "_blocks." in n]
    assert names and all(n.startswith("module.") for n in names)
    taps = FeatureTaps(wrapped, names)
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 32))
    taps.remove()
    assert sorted(taps.features) == sorted(n.removeprefix("module.") for n in names)


def test_every_stage_of_a_slimming_recipe_exports_and_matches_pytorch(slim_run, tmp_path):
    stages = sorted(p for p in slim_run.iterdir() if p.is_dir() and p.name[:2].isdigit())
    assert [p.name for p in stages] == ["01-remove-blocks", "02-recover", "03-light-decoder"]
    for stage in stages:
        bundle = Bundle.load(stage)
        components = ("unet", "vae_decoder") if stage.name == "03-light-decoder" else ("unet",)
        _onnx_matches_torch(bundle, components, tmp_path / stage.name)
    light = tmp_path / "03-light-decoder"
    graph = onnx.load(str(light / ArtifactSet.load(light).find("onnx", "vae_decoder").path)).graph
    assert {n.op_type for n in graph.node} <= {"Conv", "Relu", "Resize", "Tanh", "Add", "Mul", "Sub", "Div",
                                               "Constant", "Identity"}


def test_recovery_changed_the_student_and_logged_every_step(slim_run):
    removed = Bundle.load(slim_run / "01-remove-blocks").unet.state_dict()
    recovered = Bundle.load(slim_run / "02-recover").unet.state_dict()
    assert removed.keys() == recovered.keys()  # adapters are dropped: a plain U-Net of the slim config
    assert any(not torch.equal(removed[k], recovered[k]) for k in removed)
    lines = (slim_run / "02-recover" / "recover_log.jsonl").read_text().splitlines()
    assert len(lines) == 12


def test_light_decoder_loads_in_stock_diffusers_and_decodes_with_it(slim_run):
    folder = slim_run / "03-light-decoder"
    ours = Bundle.load(folder)
    assert isinstance(ours.vae, diffusers.AutoencoderTiny) and ours.vae.config.scaling_factor == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert isinstance(pipe.vae, diffusers.AutoencoderTiny)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        mine, theirs = ours.vae.decode(z).sample, pipe.vae.decode(z).sample
    assert mine.shape == (1, 3, 16, 16) and torch.equal(mine, theirs)
    with torch.no_grad():
        assert ours.vae.encode(mine).latents.shape == z.shape


def test_light_decoder_reconstruction_falls(deep_teacher, tmp_path):
    bundle = Bundle.load(deep_teacher)
    settings = LightDecoderPass.Settings(width=8, iterations=20, batch_size=8, data_limit=16, lr=3e-3, warmup=0,
                                         adv_weight=0.0, log_every=1)
    run = build_light_decoder(bundle, settings, tmp_path, torch.device("cpu"), progress=False)
    assert run.trainer.fit(run.step)
    import json

    rec = [json.loads(line)["reconstruction"] for line in (tmp_path / "light_decoder_log.jsonl").read_text().splitlines()]
    assert sum(rec[-4:]) / 4 < 0.7 * sum(rec[:4]) / 4, rec


@pytest.fixture
def run_cli(capsys, monkeypatch, tmp_path):
    """Call `pocketdiff ARGS` in this process from `tmp_path`: (exit code, stderr)."""
    monkeypatch.chdir(tmp_path)

    def call(*argv: str) -> tuple[int, str]:
        with warnings.catch_warnings():
            code = cli.main([str(a) for a in argv])
        return code, capsys.readouterr().err
    return call


QUICK = "iterations = 1\ndata_limit = 4\nbatch_size = 2"  # if a check ever let bad input through, fail fast


@pytest.mark.parametrize("model, table, message", [
    ("arch:tiny", 'name = "remove-blocks"\npreset = "base"', "nothing to remove"),
    ("{deep}", 'name = "remove-blocks"\nremove = ["down_blocks.7.resnets.0"]', "does not exist"),
    ("{deep}", 'name = "remove-blocks"\npreset = "small"\nremove = ["mid_block"]', "exactly one of"),
    ("{deep}", f'name = "light-decoder"\nlatent_channels = 8\n{QUICK}', "latents have 4 channels"),
    ("{deep}", f'name = "light-decoder"\nblocks = [3, 3, 1]\n{QUICK}', "one count per level"),
    ("{deep}", f'name = "light-decoder"\nsampled_share = 0.1\n{QUICK}', "is no latent at all"),
])
def test_bad_slimming_input_exits_2_with_one_line(run_cli, deep_teacher, tmp_path, model, table, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'model = "{model.format(deep=deep_teacher)}"\n[[pass]]\n{table}\n')
    code, err = run_cli("run", recipe, "--out", tmp_path / "out", "--device", "cpu")
    lines = [line for line in err.splitlines() if line.startswith("pocketdiff:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0]
    assert not (tmp_path / "out" / "01-remove-blocks").exists() and not (tmp_path / "out" / ".work").exists()


def test_block_removal_settings_need_a_preset_or_a_list():
    with pytest.raises(ValueError, match="exactly one of"):
        BlockRemovalPass.Settings()

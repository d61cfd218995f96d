"""Structured channel pruning on a tiny SD-shaped config: a smaller plain diffusers U-Net with finite outputs,
MACs down by at least the target, whole heads kept, saves/reloads/exports to ONNX and matches PyTorch there,
recovers with `recover` in one recipe; a target no valid widths meet exits 2 before any work."""

import copy

import diffusers
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from pocketdiff.bundle import Bundle
from pocketdiff.compress.slim.prune import PrunePass, plan_widths, pruned_config, unet_macs
from pocketdiff.errors import ConfigError
from pocketdiff.export.components import example_inputs, wrap
from pocketdiff.passes import PassContext
from pocketdiff.recipe import load_recipe
from pocketdiff.runner import RunOptions, run_recipe
from test_slim import _onnx_matches_torch, deep_teacher, run_cli  # noqa: F401  (fixtures shared with slimming)

pytestmark = pytest.mark.usefixtures("one_thread")
TARGET = 0.2
SIZE = 8  # the deep teacher's latent side


@pytest.fixture(scope="module")
def pruned(deep_teacher, tmp_path_factory) -> tuple[Bundle, dict]:
    """The deep teacher through `prune` at TARGET: (pruned Bundle, the pass's report)."""
    settings = PrunePass.Settings(target=TARGET, batches=2, batch_size=4, data_limit=16)
    result = PrunePass().apply(Bundle.load(deep_teacher), settings,
                               PassContext(work_dir=tmp_path_factory.mktemp("work")))
    return result.bundle, result.report


def _unet_macs(bundle: Bundle) -> int:
    """MACs of one call of the real module (plain-matmul attention, which the FLOP counter sees on CPU)."""
    unet = copy.deepcopy(bundle.unet)
    unet.set_attn_processor(AttnProcessor())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(torch.zeros(1, 4, SIZE, SIZE), torch.tensor([999]), encoder_hidden_states=torch.zeros(1, 77, 32))
    return counter.get_total_flops() // 2


def test_pruned_unet_is_a_narrower_plain_unet_with_finite_outputs(deep_teacher, pruned):
    teacher, (bundle, report) = Bundle.load(deep_teacher), pruned
    unet = bundle.unet
    assert type(unet) is diffusers.UNet2DConditionModel
    old, new = teacher.unet.config.block_out_channels, unet.config.block_out_channels
    assert new[0] == old[0] and all(n < o for n, o in zip(new[1:], old[1:]))
    assert all(c % unet.config.norm_num_groups == 0 for c in new)
    assert report["params_after"] < report["params_before"]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 900]), encoder_hidden_states=torch.randn(2, 77, 32)).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    removed = 1 - _unet_macs(bundle) / _unet_macs(teacher)  # measured on the real modules, not the plan
    assert TARGET <= removed < TARGET + 0.2 and abs(removed - report["macs_removed"]) < 1e-3, removed


def test_attention_keeps_whole_heads_of_the_teacher(deep_teacher, pruned):
    teacher, (bundle, _) = Bundle.load(deep_teacher).unet, pruned
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    t_attn, s_attn = teacher.get_submodule(name), bundle.unet.get_submodule(name)
    size = t_attn.inner_dim // t_attn.heads
    assert s_attn.inner_dim // s_attn.heads == size and s_attn.heads < t_attn.heads
    # to_k reads the unpruned text states: each student head's rows are one teacher head's rows, no two alike.
    t_heads = t_attn.to_k.weight.view(t_attn.heads, size, -1)
    picked = [next(i for i in range(t_attn.heads) if torch.equal(t_heads[i], h))
              for h in s_attn.to_k.weight.view(s_attn.heads, size, -1)]
    assert len(set(picked)) == s_attn.heads


def test_pruned_bundle_saves_reloads_and_exports(pruned, tmp_path):
    bundle, _ = pruned
    bundle.save(tmp_path / "p")
    again = Bundle.load(tmp_path / "p")
    assert again.unet.config.block_out_channels == bundle.unet.config.block_out_channels
    feeds = example_inputs(again, "unet", 2)
    with torch.no_grad():
        assert torch.equal(wrap(again, "unet").module(**feeds), wrap(bundle, "unet").module(**feeds))
    _onnx_matches_torch(again, ("unet",), tmp_path / "onnx")


def test_widths_follow_groupnorm_heads_and_shortcuts(deep_teacher):
    config = Bundle.load(deep_teacher).unet.config
    plan, removed = plan_widths(config, 0.2, SIZE)
    assert plan["block_out_channels"] == [16, 24, 24] and plan["attention_head_dim"] == [4, 3, 3]
    assert removed >= 0.2 and unet_macs(plan, SIZE) < unet_macs(dict(config), SIZE)
    # stage 1 as wide as stage 0 would drop down_blocks.1.resnets.0's shortcut conv; stages 1 and 2 apart would
    # give down_blocks.2.resnets.0 a new one: neither is a subset of the teacher, so neither is ever chosen
    with torch.device("meta"):
        keys = diffusers.UNet2DConditionModel.from_config(pruned_config(config, [16, 16, 16])).state_dict()
    assert "down_blocks.1.resnets.0.conv_shortcut.weight" not in keys
    assert plan_widths(config, 0.1, SIZE)[0]["block_out_channels"] == [16, 24, 24]
    assert plan_widths(config, 0.3, SIZE)[0]["block_out_channels"] == [16, 8, 8]


def test_target_no_valid_widths_meet_is_a_config_error(deep_teacher):
    with pytest.raises(ConfigError, match="not possible.*ask for at most 0.49"):
        plan_widths(Bundle.load(deep_teacher).unet.config, 0.6, SIZE)


@pytest.mark.parametrize("table, message", [
    ("target = 0.9", "not possible"),
    ("target = 0.0", "must be > 0.0"),
])
def test_bad_prune_input_exits_2_before_any_work(run_cli, deep_teacher, tmp_path, table, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'model = "{deep_teacher}"\n[[pass]]\nname = "prune"\n{table}\n')
    code, err = run_cli("run", recipe, "--out", tmp_path / "out", "--device", "cpu")
    lines = [line for line in err.splitlines() if line.startswith("pocketdiff:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0] and not (tmp_path / "out" / ".work").exists()


def test_prune_then_recover_recipe_runs(deep_teacher, tmp_path):
    recipe = tmp_path / "prune.toml"
    recipe.write_text(f'''model = "{deep_teacher}"
[[pass]]
name = "prune"
target = {TARGET}
batches = 1
batch_size = 4
data_limit = 16
[[pass]]
name = "recover"
iterations = 2
batch_size = 4
data_limit = 16
warmup = 0
log_every = 1
''')
    run = tmp_path / "run"
    assert run_recipe(load_recipe(recipe), run, options=RunOptions(progress=False))["finished"]
    pruned_unet = Bundle.load(run / "01-prune").unet
    recovered = Bundle.load(run / "02-recover").unet
    assert recovered.config.block_out_channels == pruned_unet.config.block_out_channels != [16, 32, 32]
    a, b = pruned_unet.state_dict(), recovered.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert len((run / "02-recover" / "recover_log.jsonl").read_text().splitlines()) == 2


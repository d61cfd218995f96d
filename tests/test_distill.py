"""Step distillation on tiny configs: resumable like an uninterrupted run, the same on 2 processes as
on 1, students that sample with their own step count, and bad input refused before training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pocketdiff.compress.distill.student import fold_guidance, with_guidance_input
from pocketdiff.errors import ConfigError, CorruptFileError, RecipeError
from pocketdiff.guidance import guidance_embedding
from pocketdiff.recipe import load_recipe
from pocketdiff.runner import RunOptions, run_recipe

LCM = """
model = "arch:tiny"
[[pass]]
name = "lcm"
iterations = {iterations}
batch_size = 4
data_limit = 16
warmup = 1
lr = {lr}
checkpoint_every = 2
loss = "{loss}"
{extra}
"""


def _recipe(tmp_path: Path, iterations: int = 4, lr: float = 1e-4, loss: str = "huber", extra: str = ""):
    path = tmp_path / f"lcm-{iterations}-{lr}-{loss}-{abs(hash(extra))}.toml"
    path.write_text(LCM.format(iterations=iterations, lr=lr, loss=loss, extra=extra))
    return load_recipe(path)


def _unet(run: Path, stage: str = "01-lcm") -> dict:
    return load_file(str(run / stage / "unet" / "diffusion_pytorch_model.safetensors"))


def _same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def test_lcm_resumed_after_a_deadline_and_a_ctrl_c_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = run_recipe(_recipe(tmp_path), tmp_path / "a", options=RunOptions(progress=False))
    assert straight["finished"] and [s["status"] for s in straight["stages"]] == ["ran"]

    run = tmp_path / "b"
    first = run_recipe(_recipe(tmp_path), run, options=RunOptions(time_limit_s=0.0, progress=False))
    assert not first["finished"] and first["stages"][-1]["status"] == "unfinished"
    assert not (run / "01-lcm").exists() and any((run / ".work").iterdir())

    from pocketdiff import training

    real = training.Trainer.one_step

    def ctrl_c_at_step_3(self, step_fn):  # a user's Ctrl-C in the middle of step 3 (checkpoint at 2)
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self, step_fn)

    monkeypatch.setattr(training.Trainer, "one_step", ctrl_c_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_recipe(tmp_path), run, options=RunOptions(progress=False))
    monkeypatch.setattr(training.Trainer, "one_step", real)
    done = run_recipe(_recipe(tmp_path), run, options=RunOptions(progress=False))
    assert done["finished"] and _same(_unet(tmp_path / "a"), _unet(run))
    assert not (run / ".work").exists()
    log = [json.loads(line) for line in (run / "01-lcm" / "lcm_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1]["step"] == 3  # one log across the three calls


def test_lcm_loss_falls_for_a_student_that_starts_off_the_teacher(tmp_path):
    from pocketdiff.zoo import build_arch

    build_arch("tiny", seed=7).save(tmp_path / "other")  # same architecture, other weights: far from consistent
    recipe = tmp_path / "fall.toml"
    recipe.write_text(LCM.format(iterations=30, lr=1e-3, loss="l2", extra="log_every = 1").replace(
        'model = "arch:tiny"', f'model = "{tmp_path / "other"}"\nteacher = "arch:tiny"'))
    run = tmp_path / "r"
    run_recipe(load_recipe(recipe), run, options=RunOptions(progress=False))
    losses = [json.loads(line)["loss"] for line in (run / "01-lcm" / "lcm_log.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


@pytest.fixture(scope="module")
def one_step_lcm(tmp_path_factory) -> Path:
    """The stage folder of a one-iteration lcm run on arch:tiny (read, never changed, by the tests that use it)."""
    folder = tmp_path_factory.mktemp("lcm1")
    run_recipe(_recipe(folder, iterations=1), folder / "r", options=RunOptions(progress=False))
    return folder / "r" / "01-lcm"


def test_student_samples_with_its_own_lcm_steps_and_guidance(one_step_lcm):
    from pocketdiff.bundle import Bundle
    from pocketdiff.sampler import SampleConfig, generate

    student = Bundle.load(one_step_lcm)
    cfg = SampleConfig.for_bundle(student)
    assert (cfg.scheduler, cfg.steps, cfg.guidance_scale) == ("lcm", 4, 4.0)
    assert student.unet.config.time_cond_proj_dim == 256
    calls = []
    student.unet.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["timestep_cond"][:, :4].clone()),
                                       with_kwargs=True)
    generate(student, ["a photo of a bag"], cfg, progress=False)
    assert len(calls) == 4  # one U-Net call per step: the guidance is embedded, no CFG pair
    expected = guidance_embedding(torch.tensor([3.0]), 256)[:, :4]
    assert all(torch.allclose(c, expected) for c in calls)


def test_folded_guidance_computes_the_student_at_that_guidance(tiny):
    student = with_guidance_input(tiny.unet)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.2)
    plain = fold_guidance(student, 3.0)
    assert plain.config.time_cond_proj_dim is None
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        want = student(x, t, encoder_hidden_states=c, timestep_cond=guidance_embedding(torch.tensor([2.0, 2.0]), 256)).sample
        got = plain(x, t, encoder_hidden_states=c).sample
        other = student(x, t, encoder_hidden_states=c, timestep_cond=guidance_embedding(torch.tensor([5.0, 5.0]), 256)).sample
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, other, atol=1e-3)


def test_two_gloo_processes_train_the_same_weights_as_one(tmp_path):
    recipe = tmp_path / "ddp.toml"
    recipe.write_text(LCM.format(iterations=3, lr=1e-3, loss="huber", extra=""))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["-m", "pocketdiff", "run", str(recipe), "--device", "cpu", "--json"]
    assert run_recipe(load_recipe(recipe), tmp_path / "one", options=RunOptions(progress=False))["finished"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29517", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    # accelerate's own launcher, as users run it (its --cpu flag would start one process; --multi_gpu
    # starts N through torchrun, and the run picks gloo for --device cpu)
    acc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "29518", *common, "--out", str(tmp_path / "acc")],
                         capture_output=True, text=True, env=env)
    for r in (two, acc):
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = _unet(tmp_path / "one"), _unet(tmp_path / "two")
    assert _same(b, _unet(tmp_path / "acc"))  # the two launchers set up the same processes
    init = _unet_of_teacher_shape(a)
    moved = torch.cat([(a[k] - init[k]).flatten() for k in a])
    apart = torch.cat([(a[k] - b[k]).flatten() for k in a])
    # Same global batch, gradients averaged over the shards: the updates agree to float summation order
    # (Adam turns those last-bit differences into at most lr-sized moves on near-zero gradients).
    assert moved.norm() > 0 and float(apart.norm() / moved.norm()) < 0.02


def _unet_of_teacher_shape(weights: dict) -> dict:
    """The untrained student (the teacher's weights and a zero guidance input): training must move it."""
    from pocketdiff.zoo import build_arch

    teacher = with_guidance_input(build_arch("tiny").unet).state_dict()
    return {k: teacher[k] for k in weights}


@pytest.mark.parametrize("extra, message", [
    ("guidance_min = -1.0", "guidance_min must be >= 1.0"),
    ("guidance_min = 7.0\nguidance_max = 3.0", "exceeds guidance_max"),
    ("sample_steps = 60", "sample_steps must be <= 50"),
    ("ddim_timesteps = 5\nsample_steps = 8", "exceeds the solver's 5 timesteps"),
    ("lr = 0.0", "lr must be > 0.0"),
    ("ema_decay = 1.5", "ema_decay must be <= 1.0"),
    ("lora_rank = 0", "lora_rank must be >= 1"),
])
def test_bad_lcm_settings_fail_when_the_recipe_is_read(tmp_path, extra, message):
    path = tmp_path / "bad.toml"
    path.write_text(LCM.format(iterations=2, lr=1e-4, loss="huber", extra="").replace("lr = 0.0001\n", "") + extra)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_teacher_without_a_noise_schedule_or_with_a_guidance_input_is_refused_before_training(tmp_path, one_step_lcm):
    bad = tmp_path / "fold.toml"
    bad.write_text('model = "arch:tiny"\n[[pass]]\nname = "fold-guidance"\n')
    with pytest.raises(ConfigError, match="needs a student with a guidance input"):
        run_recipe(load_recipe(bad), tmp_path / "r", options=RunOptions(progress=False))
    assert not (tmp_path / "r").exists()

    again = tmp_path / "again.toml"
    again.write_text(LCM.format(iterations=1, lr=1e-4, loss="huber", extra="").replace(
        'model = "arch:tiny"', f'model = "{one_step_lcm}"'))
    with pytest.raises(ConfigError, match="already takes a guidance input"):
        run_recipe(load_recipe(again), tmp_path / "r2", options=RunOptions(progress=False))
    assert not (tmp_path / "r2").exists()


def test_foreign_checkpoint_in_the_work_folder_is_a_clear_error_and_touches_nothing(tmp_path):
    run = tmp_path / "r"
    run_recipe(_recipe(tmp_path), run, options=RunOptions(time_limit_s=0.0, progress=False))
    ckpt = next((run / ".work").glob("*/lcm.ckpt"))
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptFileError, match="unreadable checkpoint"):
        run_recipe(_recipe(tmp_path), run, options=RunOptions(progress=False))
    assert ckpt.read_bytes() == b"not a checkpoint" and not (run / "01-lcm").exists()
    torch.save({"version": 2, "name": "unet", "step": 1, "modules": {}, "optimizers": {}, "emas": {}}, ckpt)
    with pytest.raises(CorruptFileError, match="not a checkpoint of training phase 'lcm'"):
        run_recipe(_recipe(tmp_path), run, options=RunOptions(progress=False))


def test_fashion_4step_loads_in_stock_diffusers_and_draws_the_same_images():
    import diffusers

    from pocketdiff.sampler import SampleConfig, encode_prompts, generate
    from pocketdiff.sources import load_model
    from pocketdiff.zoo import builtin_path

    ours = load_model("fashion-4step")
    cfg = SampleConfig.for_bundle(ours)
    assert (cfg.scheduler, cfg.steps, cfg.guidance_scale) == ("ddim", 4, 1.0)
    folder = builtin_path("fashion-4step")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.timestep_spacing == "trailing"  # the grid the progressive rounds trained on
    # The guidance is folded in (a plain U-Net), so the stock text-to-image pipeline runs it with its
    # stored DDIM scheduler and no CFG.
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    prompts = ["a photo of a sneaker", "a photo of a dress"]
    mine = generate(ours, prompts, SampleConfig(**{**cfg.__dict__, "seed": 11}), progress=False)
    for i, prompt in enumerate(prompts):
        states = encode_prompts(ours.tokenizer, ours.text_encoder, [prompt])
        theirs = pipe(prompt_embeds=states, num_inference_steps=4, guidance_scale=1.0, output_type="pt",
                      generator=torch.Generator().manual_seed(11 + i)).images
        assert theirs.shape == mine[i:i + 1].shape
        assert float((theirs - mine[i:i + 1]).abs().max()) < 1e-4


def test_lcm_lora_trains_adapters_and_fuses_them_into_a_plain_unet(tmp_path):
    run = tmp_path / "r"
    run_recipe(_recipe(tmp_path, iterations=2, lr=1e-3, extra="lora_rank = 4"), run, options=RunOptions(progress=False))
    fused = _unet(run)
    assert not [k for k in fused if "lora" in k]
    init = _unet_of_teacher_shape(fused)
    moved = {k for k in fused if not torch.equal(fused[k], init[k])}
    assert "time_embedding.cond_proj.weight" in moved
    assert any(k.endswith("attn1.to_q.weight") for k in moved)  # an adapted layer, merged into its base weight
    assert not any(k.endswith("norm1.weight") for k in moved)  # layers without adapters are frozen


PROGRESSIVE = """
model = "arch:tiny"
[[pass]]
name = "guided-distill"
iterations = {iterations}
batch_size = 4
data_limit = 16
warmup = 1
checkpoint_every = 2
sample_steps = 4
[[pass]]
name = "progressive"
iterations = {iterations}
batch_size = 4
data_limit = 16
warmup = 1
checkpoint_every = 2
"""


def test_progressive_rounds_halve_the_steps_and_resume_to_the_same_weights(tmp_path):
    from pocketdiff.bundle import Bundle
    from pocketdiff.sampler import SampleConfig, generate

    recipe = tmp_path / "p.toml"
    recipe.write_text(PROGRESSIVE.format(iterations=3))
    straight = run_recipe(load_recipe(recipe), tmp_path / "a", options=RunOptions(progress=False))
    assert [s["status"] for s in straight["stages"]] == ["ran", "ran"]
    stops = 0
    while not run_recipe(load_recipe(recipe), tmp_path / "b", options=RunOptions(time_limit_s=0.0,
                                                                                 progress=False))["finished"]:
        stops += 1
    assert stops == 4  # one step per call; the call that finishes stage 1 also starts stage 2
    assert _same(_unet(tmp_path / "a", "02-progressive"), _unet(tmp_path / "b", "02-progressive"))
    student = Bundle.load(tmp_path / "a" / "02-progressive")
    cfg = SampleConfig.for_bundle(student)
    assert (cfg.scheduler, cfg.steps) == ("ddim", 2) and student.scheduler.config.timestep_spacing == "trailing"
    calls = []
    student.unet.register_forward_hook(lambda m, a, k, o: calls.append(int(a[1][0])), with_kwargs=True)
    generate(student, ["a photo of a bag"], cfg, progress=False)
    assert calls == [999, 499]  # one call per step on the trailing grid the round trained on


def test_progressive_refuses_a_model_it_cannot_halve(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "arch:tiny"\n[[pass]]\nname = "progressive"\n')
    with pytest.raises(ConfigError, match="guidance-conditioned model"):
        run_recipe(load_recipe(bad), tmp_path / "r", options=RunOptions(progress=False))
    assert not (tmp_path / "r").exists()



CFG_AWARE = """
model = "arch:tiny"
[[pass]]
name = "cfg-aware"
iterations = {iterations}
batch_size = 4
data_limit = 16
warmup = 1
checkpoint_every = 2
sample_steps = 2
cfg_probability = 0.5
log_every = 1
"""


def test_cfg_aware_student_keeps_cfg_resumes_and_mixes_both_losses(tmp_path):
    from pocketdiff.bundle import Bundle
    from pocketdiff.sampler import SampleConfig, generate

    recipe = tmp_path / "c.toml"
    recipe.write_text(CFG_AWARE.format(iterations=6))
    run_recipe(load_recipe(recipe), tmp_path / "a", options=RunOptions(progress=False))
    while not run_recipe(load_recipe(recipe), tmp_path / "b", options=RunOptions(time_limit_s=0.0,
                                                                                 progress=False))["finished"]:
        pass
    assert _same(_unet(tmp_path / "a", "01-cfg-aware"), _unet(tmp_path / "b", "01-cfg-aware"))
    log = [json.loads(line) for line in (tmp_path / "a" / "01-cfg-aware" / "cfg-aware_log.jsonl").read_text().splitlines()]
    assert {r["cfg"] for r in log} == {0.0, 1.0}  # p = 0.5 over 6 seeded steps drew both losses
    student = Bundle.load(tmp_path / "a" / "01-cfg-aware")
    assert student.unet.config.time_cond_proj_dim is None
    cfg = SampleConfig.for_bundle(student)
    assert (cfg.scheduler, cfg.steps, cfg.guidance_scale) == ("ddim", 2, 4.0)
    calls = []
    student.unet.register_forward_hook(lambda m, a, k, o: calls.append(a[0].shape[0]), with_kwargs=True)
    generate(student, ["a photo of a bag"], cfg, progress=False)
    assert calls == [2, 2]  # two steps, each a CFG pair: negative prompts still work


def test_cfg_aware_refuses_a_guidance_conditioned_student(tmp_path, one_step_lcm):
    bad = tmp_path / "bad.toml"
    bad.write_text(CFG_AWARE.format(iterations=1).replace('model = "arch:tiny"',
                                                          f'model = "{one_step_lcm}"\nteacher = "arch:tiny"'))
    with pytest.raises(ConfigError, match="ordinary CFG"):
        run_recipe(load_recipe(bad), tmp_path / "r", options=RunOptions(progress=False))
    assert not (tmp_path / "r").exists()


CFG_ROUND = """
[[pass]]
name = "cfg-aware"
iterations = 2
batch_size = 4
data_limit = 16
warmup = 1
sample_steps = {steps}
round_teacher = "input"
"""


def test_cfg_aware_rounds_halve_the_input_models_steps_and_refuse_another_count(tmp_path):
    from pocketdiff.bundle import Bundle

    recipe = tmp_path / "r.toml"
    recipe.write_text(CFG_AWARE.format(iterations=2).replace("sample_steps = 2", "sample_steps = 4")
                      + CFG_ROUND.format(steps=2))
    report = run_recipe(load_recipe(recipe), tmp_path / "a", options=RunOptions(progress=False))
    assert [s["status"] for s in report["stages"]] == ["ran", "ran"]
    first, second = Bundle.load(tmp_path / "a" / "01-cfg-aware"), Bundle.load(tmp_path / "a" / "02-cfg-aware")
    assert (first.manifest.sampling["steps"], second.manifest.sampling["steps"]) == (4, 2)
    assert not _same(_unet(tmp_path / "a", "01-cfg-aware"), _unet(tmp_path / "a", "02-cfg-aware"))

    bad = tmp_path / "bad.toml"
    bad.write_text(f'model = "{tmp_path / "a" / "01-cfg-aware"}"\nteacher = "arch:tiny"\n' + CFG_ROUND.format(steps=1))
    with pytest.raises(ConfigError, match="input samples in 4 steps, so sample_steps must be 2"):
        run_recipe(load_recipe(bad), tmp_path / "r", options=RunOptions(progress=False))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("stage", [
    'name = "guided-distill"\nsample_steps = 4',
    'name = "cfg-aware"\nsample_steps = 2\ncfg_probability = 0.0\ndenoising_weight = 0.0',
])
def test_step_distillation_loss_falls_for_a_student_that_starts_off_the_teacher(tmp_path, stage):
    from pocketdiff.zoo import build_arch

    build_arch("tiny", seed=7).save(tmp_path / "other")
    recipe = tmp_path / "fall.toml"
    recipe.write_text(f'model = "{tmp_path / "other"}"\nteacher = "arch:tiny"\n[[pass]]\n{stage}\niterations = 30\n'
                      'batch_size = 4\ndata_limit = 16\nwarmup = 1\nlr = 1e-3\nlog_every = 1\n')
    run_recipe(load_recipe(recipe), tmp_path / "r", options=RunOptions(progress=False))
    name = stage.split('"')[1]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "r" / f"01-{name}" / f"{name}_log.jsonl")
              .read_text().splitlines()]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)  # a student that learns nothing stays near 1


def test_cli_run_stopped_by_its_time_limit_exits_75_with_one_unfinished_line(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(LCM.format(iterations=4, lr=1e-4, loss="huber", extra=""))
    r = subprocess.run([sys.executable, "-m", "pocketdiff", "run", str(recipe), "--out", str(tmp_path / "run"),
                        "--device", "cpu", "--time-limit", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 75, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pocketdiff: unfinished: stage 01-lcm reached the time limit") and "Traceback" not in r.stderr

"""DMD2 one-step distillation on tiny configs: finite losses, a generator that moves toward the teacher's
distribution, the two time scales, resume equal to an uninterrupted run, stock-diffusers sampling, and bad
input refused at the CLI before any training."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bad_input_cli import _one_line_error, run_cli  # noqa: F401  (run_cli is a fixture)
from test_distill import _same, _unet

from pocketdiff.bundle import Bundle
from pocketdiff.recipe import load_recipe
from pocketdiff.runner import RunOptions, run_recipe

SETTINGS = {"iterations": 3, "batch_size": 4, "data_limit": 16, "warmup": 1, "checkpoint_every": 2,
            "critic_updates": 2, "sample_steps": 1, "guidance": 2.0, "gan_weight": 0.01, "log_every": 1}
STAGE = "01-dmd"


def _recipe(folder: Path, model: str = "arch:tiny", teacher: str = "arch:tiny", **settings: float) -> Path:
    """A one-stage dmd recipe on tiny models: `SETTINGS` with `settings` over them."""
    table = "\n".join(f"{k} = {v!r}" for k, v in {**SETTINGS, **settings}.items())
    path = folder / f"dmd-{abs(hash((model, teacher, table)))}.toml"
    path.write_text(f'model = "{model}"\nteacher = "{teacher}"\n[[pass]]\nname = "dmd"\n{table}\n')
    return path


def _run(recipe: Path, out: Path, time_limit_s: float | None = None) -> dict:
    return run_recipe(load_recipe(recipe), out, options=RunOptions(time_limit_s=time_limit_s, progress=False))


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs of three generator steps, two critic updates each: one-step and two-step generators."""
    folder = tmp_path_factory.mktemp("dmd")
    runs = {}
    for steps in (1, 2):
        runs[steps] = folder / f"run{steps}"
        assert _run(_recipe(folder, sample_steps=steps), runs[steps])["finished"]
    return runs


def test_dmd_loss_terms_are_finite_at_every_step(straight_runs):
    log = [json.loads(line) for line in (straight_runs[1] / STAGE / "dmd_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    terms = ("dm", "generator_gan", "loss", "critic", "denoise", "critic_gan", "real_prob", "fake_prob")
    assert all(math.isfinite(r[k]) for r in log for k in terms), log
    report = json.loads((straight_runs[1] / STAGE / "stage.json").read_text())["report"]
    assert report["guidance_baked_in"] == 2.0 and report["guidance_input"] is False and report["timesteps"] == [999]


def test_critic_steps_critic_updates_times_per_generator_step(tmp_path):
    recipe, run = _recipe(tmp_path, iterations=4, critic_updates=3), tmp_path / "r"
    for generator_steps in (1, 2):
        assert not _run(recipe, run, time_limit_s=0.0)["finished"]  # one step per call, then a checkpoint
        state = torch.load(next((run / ".work").glob("*/dmd.ckpt")), weights_only=True)
        adam = {name: {int(s["step"]) for s in opt["state"].values()} for name, opt in state["optimizers"].items()}
        assert adam == {"generator": {generator_steps}, "critic": {3 * generator_steps}}
        assert {n: e["optimization_step"] for n, e in state["emas"].items()} == {
            "generator": generator_steps, "critic": 3 * generator_steps}
        assert set(state["modules"]) == {"generator", "fake_score", "gan_head"}


def test_dmd_resumed_after_interruptions_matches_an_uninterrupted_run(tmp_path, straight_runs):
    recipe, run = _recipe(tmp_path, sample_steps=2), tmp_path / "r"  # backward simulation: the most randomness
    calls = 1
    while not _run(recipe, run, time_limit_s=0.0)["finished"]:
        calls += 1
    assert calls == 3  # one generator step per call: two stop at the deadline, the third finishes
    assert _same(_unet(straight_runs[2], STAGE), _unet(run, STAGE))  # bitwise
    assert not _same(_unet(straight_runs[2], STAGE), _unet(straight_runs[1], STAGE), atol=1e-6)


@pytest.mark.parametrize("steps, timesteps", [(1, [999]), (2, [999, 499])])
def test_generator_draws_the_same_images_in_stock_diffusers(straight_runs, steps, timesteps):
    import diffusers

    from pocketdiff.sampler import SampleConfig, encode_prompts, generate

    folder = straight_runs[steps] / STAGE
    ours = Bundle.load(folder)
    cfg = SampleConfig.for_bundle(ours)
    assert (cfg.scheduler, cfg.steps, cfg.guidance_scale) == ("lcm", steps, 1.0)
    assert ours.unet.config.time_cond_proj_dim is None  # the guidance is baked in: a plain U-Net
    calls = []
    ours.unet.register_forward_hook(lambda m, a, k, o: calls.append((int(a[1][0]), len(a[0]))), with_kwargs=True)
    mine = generate(ours, ["a photo of a bag", "a photo of a dress"], SampleConfig(**{**cfg.__dict__, "seed": 5}),
                    progress=False)
    assert calls == [(t, 2) for t in timesteps]  # one call per step on the grid it learnt, no CFG pair
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae"), text_encoder=ours.text_encoder,
        tokenizer=ours.tokenizer, unet=unet, scheduler=diffusers.LCMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for i, prompt in enumerate(["a photo of a bag", "a photo of a dress"]):
        states = encode_prompts(ours.tokenizer, ours.text_encoder, [prompt])
        theirs = pipe(prompt_embeds=states, num_inference_steps=steps, guidance_scale=1.0, output_type="pt",
                      generator=torch.Generator().manual_seed(5 + i)).images
        assert float((theirs - mine[i:i + 1]).abs().max()) < 1e-4


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory) -> Path:
    """arch:tiny after a short denoising fit on the tiny latents: a teacher whose samples have the latents'
    scale (a random U-Net's samples are far wider, with no distribution its score describes)."""
    from pocketdiff.compress.distill.data import load_latent_data
    from pocketdiff.compress.distill.schedule import NoiseSchedule
    from pocketdiff.training import LoopSpec, OptimizerSpec, Trainer
    from pocketdiff.zoo import build_arch

    folder = tmp_path_factory.mktemp("teacher")
    teacher = build_arch("tiny")
    data = load_latent_data(teacher, folder / "work", torch.device("cpu"), limit=16)
    sched = NoiseSchedule.from_scheduler(teacher.scheduler)
    unet = teacher.unet.train().requires_grad_(True)

    def loss(g: torch.Generator) -> torch.Tensor:
        z0, cond, uncond, _ = data.sample(g, 32)
        cond = torch.where((torch.rand(32, generator=g) < 0.1).view(-1, 1, 1), uncond, cond)
        t, noise = torch.randint(sched.steps, (32,), generator=g), torch.randn(z0.shape, generator=g)
        return ((unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=cond).sample - noise) ** 2).mean()

    fit = Trainer(LoopSpec("teacher", 100, folder / "work"), {"unet": unet},
                  [OptimizerSpec("unet", ["unet"], 2e-3, grad_clip=None, final_lr_fraction=1.0)], progress=False)
    assert fit.fit(lambda c: loss(c.generator))
    teacher.unet = unet.eval().requires_grad_(False)
    teacher.save(folder / "teacher")
    return folder / "teacher"


def _probe_latents(bundle: Bundle, scheduler: str, steps: int, guidance: float) -> torch.Tensor:
    """Final latents of `bundle` for a fixed probe (32 captions, fixed starting noise) through pocketdiff's sampler."""
    from pocketdiff.data import caption_set
    from pocketdiff.sampler import TorchComponents, sample_latents
    from pocketdiff.schedulers import make_scheduler

    prompts = caption_set()[1:33]
    parts = TorchComponents(bundle)
    uncond = parts.encode([""] * len(prompts)) if guidance > 1 else None
    start = torch.randn((len(prompts), 4, 8, 8), generator=torch.Generator().manual_seed(123))
    return sample_latents(parts, make_scheduler(scheduler, bundle.scheduler.config), parts.encode(prompts), uncond,
                          start, steps, guidance)


def _moment_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS gap of the per-element means plus RMS gap of the per-element spreads of two sample sets."""
    gap = lambda x, y: float((x - y).pow(2).mean().sqrt())  # noqa: E731
    return gap(a.mean(0), b.mean(0)) + gap(a.std(0), b.std(0))


def test_generator_moves_toward_the_teacher_distribution(tmp_path, trained_teacher):
    teacher = Bundle.load(trained_teacher)
    target = _probe_latents(teacher, "ddim", 10, 2.0)  # the teacher's own guided distribution, many steps
    before = _moment_distance(_probe_latents(teacher, "lcm", 1, 1.0), target)  # the generator as initialised
    # A critic much faster than the generator (the two time scales): the fake score must track the generator
    # within a few steps for the score difference to point toward the teacher.
    recipe = _recipe(tmp_path, iterations=20, critic_updates=3, batch_size=16, generator_lr=1e-4, critic_lr=1e-3,
                     ema_decay=0.0, model=str(trained_teacher), teacher=str(trained_teacher))
    _run(recipe, tmp_path / "r")
    after = _moment_distance(_probe_latents(Bundle.load(tmp_path / "r" / STAGE), "lcm", 1, 1.0), target)
    assert after < 0.85 * before, (before, after)


def _teacher_variant(folder: Path, kind: str) -> Path:
    """arch:tiny saved with one thing DMD needs missing: a usable prediction type, or a mid block."""
    import diffusers

    from pocketdiff.zoo import ARCHS, build_arch

    bundle = build_arch("tiny")
    if kind == "no-mid-block":
        bundle.unet = diffusers.UNet2DConditionModel(**ARCHS["tiny"].unet, mid_block_type=None)
    bundle.save(folder / kind)
    if kind == "sample-prediction":
        config = folder / kind / "scheduler" / "scheduler_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    return folder / kind


@pytest.mark.parametrize("case, message", [
    ({"critic_updates": 0}, "critic_updates must be >= 1"),
    ({"gan_weight": -0.5}, "gan_weight must be >= 0.0"),
    ("sample-prediction", "prediction type 'sample'"),
    ("no-mid-block", "has none; set gan_weight = 0"),
])
def test_bad_dmd_input_is_one_line_exit_2_before_any_work(run_cli, tmp_path, case, message):  # noqa: F811
    if isinstance(case, dict):
        recipe = _recipe(tmp_path, **case)
    else:
        recipe = _recipe(tmp_path, teacher=str(_teacher_variant(tmp_path, case)))
    code, _, err = run_cli("run", recipe, "--out", tmp_path / "out", "--device", "cpu")
    assert code == 2 and message in _one_line_error(err), err
    assert not (tmp_path / "out").exists()


def test_checkpoint_that_does_not_match_the_model_is_exit_2_and_kept(run_cli, tmp_path):  # noqa: F811
    recipe, run = _recipe(tmp_path), tmp_path / "r"
    _run(recipe, run, time_limit_s=0.0)
    ckpt = next((run / ".work").glob("*/dmd.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    state["modules"]["gan_head"] = {"body.0.weight": torch.zeros(1)}  # a head of some other model
    torch.save(state, ckpt)
    foreign = ckpt.read_bytes()
    code, _, err = run_cli("run", recipe, "--out", run, "--device", "cpu")
    assert code == 2 and "does not match this model" in _one_line_error(err), err
    assert ckpt.read_bytes() == foreign and not (run / STAGE).exists()


def test_python_m_pocketdiff_run_refuses_a_bad_setting_in_one_line(tmp_path):
    recipe = _recipe(tmp_path, critic_updates=0)
    done = subprocess.run([sys.executable, "-m", "pocketdiff", "run", str(recipe), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "critic_updates must be >= 1" in _one_line_error(done.stderr)
    assert not (tmp_path / "out").exists()

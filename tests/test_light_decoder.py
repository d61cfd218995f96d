"""A Bundle whose VAE is the light decoder's AutoencoderTiny, on tiny configs: costs, the vae_encoder export,
the autoencoder floor, export to ONNX and ExecuTorch and validation; the light-decoder pass trains on the
Bundle's own sampled latents, cached so a resumed run equals an uninterrupted one."""

import warnings
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pocketdiff import cli, evaluate
from pocketdiff.bundle import Bundle
from pocketdiff.compress.slim import decoder
from pocketdiff.compress.slim.decoder import (SAMPLED_FILE, LightDecoderPass, build_light_decoder,
                                              light_vae_config, sample_config)
from pocketdiff.costs import measure_costs
from pocketdiff.data import caption_set
from pocketdiff.export.base import ExportOptions, export_bundle
from pocketdiff.export.components import example_inputs, wrap
from pocketdiff.recipe import load_recipe
from pocketdiff.runner import RunOptions, run_recipe
from pocketdiff.runtimes.base import open_session
from pocketdiff.sampler import TorchComponents, latent_batches
from pocketdiff.vae import decoder_params, encode_latents, posterior
from pocketdiff.zoo import build_arch


@pytest.fixture(scope="module")
def light_bundle() -> Bundle:
    """arch:tiny (seed 0, what `validate` rebuilds from the manifest) with an untrained width-8 AutoencoderTiny."""
    bundle = build_arch("tiny", seed=0)
    torch.manual_seed(0)
    bundle.vae = diffusers.AutoencoderTiny(**light_vae_config(bundle.vae, 8, None)).eval()
    return bundle


@pytest.fixture(scope="module")
def light_folder(light_bundle, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("light") / "model"
    light_bundle.save(folder)
    return folder


def _cli(*argv) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.main([str(a) for a in argv])


def test_costs_count_each_vae_classes_own_decoder(light_bundle, tiny, light_folder):
    light = next(c for c in measure_costs(light_bundle) if c.component == "vae_decoder")
    assert light.params == sum(p.numel() for p in light_bundle.vae.decoder.parameters()) == decoder_params(
        light_bundle.vae) and light.macs > 0
    kl = next(c for c in measure_costs(tiny) if c.component == "vae_decoder")
    assert kl.params == sum(p.numel() for m in (tiny.vae.decoder, tiny.vae.post_quant_conv) for p in m.parameters())
    assert _cli("info", light_folder) == 0


def test_vae_encoder_of_a_tiny_vae_exports_its_latents(light_bundle, tmp_path):
    x = example_inputs(light_bundle, "vae_encoder", 2)["sample"]
    with torch.no_grad():
        got = wrap(light_bundle, "vae_encoder").module(sample=x)
        assert torch.equal(got, light_bundle.vae.encode(x).latents)
        assert torch.equal(posterior(light_bundle.vae, x)[1], torch.zeros_like(got))
    aset = export_bundle(light_bundle, "light", ["onnx"], ExportOptions(components=("vae_encoder",), batch_sizes=(1,)),
                         tmp_path)
    out = open_session(aset.find("onnx", "vae_encoder"), tmp_path).run({"sample": x[:1].numpy()})
    np.testing.assert_allclose(next(iter(out.values())), got[:1].numpy(), atol=1e-5)


def test_autoencoder_floor_goes_through_a_tiny_vae(light_bundle, monkeypatch):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(evaluate, "real_images", lambda split, n, data_root=None: images[:n])

    class Scored:  # stands in for the Inception yardstick: keeps what it was asked to score
        def score(self, got):
            self.images = got
            return {"samples": len(got)}

    yardstick = Scored()
    assert evaluate.autoencoder_floor(light_bundle, yardstick, 3, batch=2)["samples"] == 3
    with torch.no_grad():
        want = ((light_bundle.vae.decode(encode_latents(light_bundle.vae, images * 2 - 1)).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(yardstick.images, want)


def test_export_onnx_and_executorch_then_validate_a_tiny_decoder_bundle(light_folder, tmp_path):
    art = tmp_path / "art"
    assert _cli("export", light_folder, "--targets", "onnx,executorch", "--components", "vae_decoder,vae_encoder",
                "--out", art) == 0
    assert _cli("validate", art, "--model", light_folder, "--steps", "2") == 0


SAMPLED = dict(width=8, iterations=4, batch_size=4, data_limit=8, lr=1e-3, warmup=0, adv_start=1, checkpoint_every=2,
               sampled_share=0.5, sampled_count=6, sample_steps=2, sample_guidance=2.0, log_every=1)


def test_sampled_latents_come_from_the_bundles_sampler_and_fill_their_share(tiny, tmp_path):
    s = LightDecoderPass.Settings(**SAMPLED)
    run = build_light_decoder(tiny, s, tmp_path, torch.device("cpu"), progress=False)
    cached = load_file(str(tmp_path / SAMPLED_FILE))["latents"]
    captions = caption_set()[1:]
    prompts = [captions[i % len(captions)] for i in range(6)]
    direct = torch.cat(list(latent_batches(tiny, prompts, sample_config(tiny, s), TorchComponents(tiny),
                                           progress=False)))
    torch.testing.assert_close(cached, direct)  # the cached caption states give the text encoder's latents
    batch = run.draw(torch.Generator().manual_seed(5))
    assert batch.shape[0] == 4
    from_cache = [any(torch.equal(row, c) for c in cached) for row in batch]
    assert from_cache == [False, False, True, True]


LIGHT_RECIPE = 'model = "arch:tiny"\n[[pass]]\nname = "light-decoder"\n' + "".join(
    f"{k} = {v}\n" for k, v in SAMPLED.items())


def test_light_decoder_on_sampled_latents_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    recipe = tmp_path / "light.toml"
    recipe.write_text(LIGHT_RECIPE)
    straight = run_recipe(load_recipe(recipe), tmp_path / "a", options=RunOptions(progress=False))
    assert straight["finished"]

    run = tmp_path / "b"
    first = run_recipe(load_recipe(recipe), run, options=RunOptions(time_limit_s=0.0, progress=False))
    assert not first["finished"]
    assert [p.name for p in (run / ".work").rglob(SAMPLED_FILE)]

    def no_resampling(*args, **kwargs):
        raise AssertionError("a resumed run must read the cached sampled latents")

    monkeypatch.setattr(decoder, "latent_batches", no_resampling)
    done = run_recipe(load_recipe(recipe), run, options=RunOptions(progress=False))
    assert done["finished"]
    weights = "01-light-decoder/vae/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "a" / weights)), load_file(str(run / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_light_decoder_quality_bench_compares_the_two_decoders_on_sampled_latents(light_folder, tmp_path):
    import importlib.util

    bench = Path(__file__).resolve().parent.parent / "bench" / "light_decoder_quality.py"
    spec = importlib.util.spec_from_file_location("light_decoder_quality", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build_arch("tiny", seed=0).save(tmp_path / "teacher")
    args = ["--n", "3", "--steps", "2", "--batch-size", "2"]
    light = module.main([str(light_folder), "--teacher", str(tmp_path / "teacher"), *args])
    assert light["samples"] == 3 and np.isfinite(light["psnr_db"]) and light["worst_image_psnr_db"] <= light["psnr_db"]
    same = module.main([str(tmp_path / "teacher"), "--teacher", str(tmp_path / "teacher"), *args])
    assert same["psnr_db"] == float("inf") and same["ssim"] == pytest.approx(1.0)

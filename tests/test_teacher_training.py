"""Teacher training on CPU at a few steps: resuming gives the same weights as never stopping, and
the decoder fine-tune moves the decoder only."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pocketdiff.teacher.config import TrainConfig
from pocketdiff.teacher.train import train_teacher

SMALL = dict(vae_steps=2, vae_batch=4, decoder_steps=2, decoder_batch=4, decoder_adv_weight=0.1,
             unet_steps=2, unet_batch=4, warmup=1, checkpoint_every=100)
IMAGES = 8


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    return tmp_path_factory.mktemp("captions") / "captions.safetensors"


def _weights(folder, part):
    return load_file(str(folder / part / "diffusion_pytorch_model.safetensors"))


def test_resumed_run_matches_uninterrupted_run(tmp_path, captions):
    straight = train_teacher(tmp_path / "a", TrainConfig(**SMALL), captions_cache=captions, device="cpu",
                             data_limit=IMAGES, progress=False)
    assert straight["finished"] and set(straight["final_loss"]) == {"vae", "decoder", "unet"}
    stops = []
    for _ in range(10):  # a zero time limit stops every phase after one step
        summary = train_teacher(tmp_path / "b", TrainConfig(**SMALL, time_limit=0.0), captions_cache=captions,
                                device="cpu", data_limit=IMAGES, progress=False)
        if summary["finished"]:
            break
        stops.append(summary.get("stopped_in", "unet"))  # a stopped U-Net phase still writes the pipeline
    assert stops == ["vae", "decoder", "unet"]
    for part in ("vae", "unet"):
        a, b = _weights(tmp_path / "a", part), _weights(tmp_path / "b", part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_decoder_finetune_keeps_the_encoder(tmp_path, captions):
    base = TrainConfig(**{**SMALL, "decoder_steps": 0, "unet_steps": 0})
    train_teacher(tmp_path / "base", base, captions_cache=captions, device="cpu", data_limit=IMAGES, progress=False)
    tuned = TrainConfig(**{**SMALL, "decoder_steps": 3, "unet_steps": 0})
    summary = train_teacher(tmp_path / "tuned", tuned, captions_cache=captions, device="cpu", data_limit=IMAGES,
                            progress=False, vae_from=tmp_path / "base")
    assert summary["finished"] and "before_decoder_finetune" in summary
    a, b = _weights(tmp_path / "base", "vae"), _weights(tmp_path / "tuned", "vae")
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert any(k.startswith("decoder.") for k in changed)


def test_train_cli_bad_data_folder_is_one_line_exit_2(tmp_path, capsys):
    from pocketdiff.cli import main

    # the `main` of `python -m pocketdiff`, in this process
    code = main(["train", "teacher", "--out", str(tmp_path / "t"), "--data", str(tmp_path / "missing"), "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert json.loads(out)["error"]["exit_code"] == 2  # --json: the failure is JSON on stdout too
    assert not (tmp_path / "t").exists() and not (tmp_path / ".t.train").exists()

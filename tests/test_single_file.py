"""Single-file SD1.x checkpoints: loaded offline bit-exactly, bad files refused with clear errors."""

import pytest
import torch
import transformers
from safetensors.torch import save_file

from pocketdiff.cli import main
from pocketdiff.single_file import save_single_file
from pocketdiff.errors import ConfigError, CorruptFileError, InputPathError
from pocketdiff.sources import load_model
from pocketdiff.zoo import load_fashion


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The fashion teacher's U-Net and VAE (SD1.5 topology) with a small CLIP text encoder, in LDM format."""
    torch.manual_seed(0)
    bundle = load_fashion()
    bundle.text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=384, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4)).eval()
    root = tmp_path_factory.mktemp("single")
    save_single_file(bundle, root / "model.safetensors")
    bundle.save(root / "config")
    return bundle, root


def test_single_file_loads_bit_identical(checkpoint):
    reference, root = checkpoint
    loaded = load_model(str(root / "model.safetensors"), config=root / "config")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k].float(), b[k]) for k in a), name
    assert loaded.tokenizer is not None
    assert loaded.manifest.source["kind"] == "single-file" and loaded.manifest.source["family"] == "sd15"


def test_zoo_config_that_does_not_fit_is_a_config_error(checkpoint):
    _, root = checkpoint
    with pytest.raises(ConfigError, match="not sd15's"):
        load_model(str(root / "model.safetensors"))


def test_bad_single_files(tmp_path, checkpoint, capsys):
    _, root = checkpoint
    with pytest.raises(InputPathError):
        load_model(str(tmp_path / "missing.safetensors"))
    data = (root / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="unreadable|truncated"):
        load_model(str(tmp_path / "cut.safetensors"))
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="not an original-format"):
        load_model(str(tmp_path / "other.safetensors"))
    code = main(["info", str(tmp_path / "cut.safetensors")])  # the `main` of `python -m pocketdiff`, in this process
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "cut.safetensors" in err

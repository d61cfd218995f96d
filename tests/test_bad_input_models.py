"""Bad models and artifacts through the CLI: corrupt folders, lying safetensors, checkpoints with parts
missing, pickles, malformed artifacts.json, corrupt artifacts for validate, and a planted fault.

Each case: exit 2 (1 for a missed gate), one line on stderr naming the file or key, no traceback.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pocketdiff.cli import main

Edit = Callable[[Path], None]


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """arch:tiny seed 0 as a diffusers folder (seed 0 is what `validate` rebuilds for arch:tiny)."""
    from pocketdiff.zoo import build_arch

    folder = tmp_path_factory.mktemp("bad") / "tiny"
    build_arch("tiny", seed=0).save(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_single_file(tiny_pipeline_dir: Path) -> Path:
    from pocketdiff.bundle import Bundle
    from pocketdiff.single_file import save_single_file

    path = tiny_pipeline_dir.parent / "tiny.safetensors"
    save_single_file(Bundle.load(tiny_pipeline_dir), path)
    return path


@pytest.fixture(scope="module")
def tiny_artifacts(tiny_pipeline_dir: Path) -> Path:
    from pocketdiff.export.base import ExportOptions, export_bundle
    from pocketdiff.zoo import build_arch

    out = tiny_pipeline_dir.parent / "art"
    export_bundle(build_arch("tiny", seed=0), "arch:tiny", ["onnx"],
                  ExportOptions(components=("text_encoder", "unet", "vae_decoder"), batch_sizes=(1,)), out)
    return out


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of `pocketdiff ARGV`, run in this process."""
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, want_code: int, names: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == want_code, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("pocketdiff: ") and names in lines[0], lines[0]


# --- helpers that break one thing -----------------------------------------------------------------------

def write(rel: str, text: str | bytes) -> Edit:
    return lambda d: (d / rel).write_bytes(text if isinstance(text, bytes) else text.encode())


def set_key(rel: str, key: str, value: object) -> Edit:
    def edit(d: Path) -> None:
        data = json.loads((d / rel).read_text())
        data[key] = value
        (d / rel).write_text(json.dumps(data))
    return edit


def drop_key(rel: str, key: str) -> Edit:
    def edit(d: Path) -> None:
        data = json.loads((d / rel).read_text())
        del data[key]
        (d / rel).write_text(json.dumps(data))
    return edit


UNET_W = "unet/diffusion_pytorch_model.safetensors"


def header_lie(rel: str, change: Callable[[dict], None] | None = None, length: int | None = None,
               cut: int = 0, extra: bytes = b"") -> Edit:
    """Rewrite a safetensors file's header with `change`, its length prefix with `length`, its data cut or padded."""
    def edit(d: Path) -> None:
        blob = (d / rel).read_bytes()
        n = struct.unpack("<Q", blob[:8])[0]
        header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
        if change:
            change(header)
        text = json.dumps(header).encode()
        (d / rel).write_bytes(struct.pack("<Q", len(text) if length is None else length) + text
                              + data[:len(data) - cut] + extra)
    return edit


def _first(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def _overlap(header: dict) -> None:
    a, b = [header[k] for k in sorted(header, key=lambda k: header[k].get("data_offsets", [0])[0])
            if k != "__metadata__"][:2]
    b["data_offsets"] = [b["data_offsets"][0] - 4, b["data_offsets"][1] - 4]


def _past_end(header: dict) -> None:
    """Move the first tensor's (consistent) range behind the end of the data."""
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    first = _first(header)
    size = first["data_offsets"][1] - first["data_offsets"][0]
    first["data_offsets"] = [end, end + size]


def tensors(rel: str, change: Callable[[dict], None]) -> Edit:
    def edit(d: Path) -> None:
        state = load_file(d / rel)
        change(state)
        save_file(state, str(d / rel), metadata={"format": "pt"})
    return edit


class Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.target, "pwned"))


def pickled(rel: str, marker: Path, remove: str | None = None) -> Edit:
    def edit(d: Path) -> None:
        (d / rel).write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
        if remove:
            (d / remove).unlink()
    return edit


FOLDER_CASES: list[tuple[str, Edit, str]] = [
    ("index is a list", write("model_index.json", "[1, 2]"), "model_index.json"),
    ("index is a string", write("model_index.json", '"unet"'), "model_index.json"),
    ("index not JSON", write("model_index.json", "{"), "model_index.json"),
    ("index empty", write("model_index.json", ""), "model_index.json"),
    ("index binary", write("model_index.json", b"\xff\xfe\x00"), "model_index.json"),
    ("index entry a string", set_key("model_index.json", "unet", "diffusers"), "'unet'"),
    ("index entry a number", set_key("model_index.json", "unet", 5), "'unet'"),
    ("index entry too short", set_key("model_index.json", "vae", ["diffusers"]), "'vae'"),
    ("index class a number", set_key("model_index.json", "unet", ["diffusers", 3]), "'unet'"),
    ("index unknown library", set_key("model_index.json", "unet", ["torch", "nn"]), "'unet'"),
    ("index unknown class", set_key("model_index.json", "vae", ["diffusers", "NoSuchVae"]), "'vae'"),
    ("index dunder class", set_key("model_index.json", "unet", ["diffusers", "__class__"]), "'unet'"),
    ("index wrong kind of class", set_key("model_index.json", "unet", ["diffusers", "DDIMScheduler"]), "'unet'"),
    ("index pipeline as unet", set_key("model_index.json", "unet", ["diffusers", "DiffusionPipeline"]), "'unet'"),
    ("index _class_name a number", set_key("model_index.json", "_class_name", 5), "_class_name"),
    ("index without unet", drop_key("model_index.json", "unet"), "unet"),
    ("unet folder missing", lambda d: shutil.rmtree(d / "unet"), "unet"),
    ("unet sample_size a string", set_key("unet/config.json", "sample_size", "64"), "sample_size"),
    ("unet block_out_channels a string", set_key("unet/config.json", "block_out_channels", "abc"), "block_out_channels"),
    ("unet block_out_channels negative", set_key("unet/config.json", "block_out_channels", [-1, 64]),
     "block_out_channels"),
    ("unet block_out_channels huge", set_key("unet/config.json", "block_out_channels", [10**9, 64]), "block_out_channels"),
    ("unet layers_per_block 0", set_key("unet/config.json", "layers_per_block", 0), "layers_per_block"),
    ("unet layers_per_block bool", set_key("unet/config.json", "layers_per_block", True), "layers_per_block"),
    ("unet cross_attention_dim text", set_key("unet/config.json", "cross_attention_dim", "x"), "cross_attention_dim"),
    ("unet down_block_types a string", set_key("unet/config.json", "down_block_types", "Down"), "down_block_types"),
    ("unet block types mismatched", set_key("unet/config.json", "down_block_types", ["DownBlock2D"]), "unet"),
    ("unet more layers than weights", set_key("unet/config.json", "layers_per_block", 2), "missing"),
    ("unet config a list", write("unet/config.json", "[]"), "unet/config.json"),
    ("unet config not JSON", write("unet/config.json", "{"), "unet/config.json"),
    ("unet config missing", lambda d: (d / "unet/config.json").unlink(), "config.json"),
    ("vae scaling_factor a string", set_key("vae/config.json", "scaling_factor", "0.18"), "scaling_factor"),
    ("vae scaling_factor NaN", write("vae/config.json", '{"scaling_factor": NaN}'), "scaling_factor"),
    ("vae scaling_factor negative", set_key("vae/config.json", "scaling_factor", -1), "scaling_factor"),
    ("vae block_out_channels a string", set_key("vae/config.json", "block_out_channels", "32"), "block_out_channels"),
    ("vae layers_per_block float", set_key("vae/config.json", "layers_per_block", 1.5), "layers_per_block"),
    ("vae latent_channels 0", set_key("vae/config.json", "latent_channels", 0), "latent_channels"),
    ("scheduler beta_schedule unknown", set_key("scheduler/scheduler_config.json", "beta_schedule", "bogus"),
     "beta_schedule"),
    ("scheduler timesteps a string", set_key("scheduler/scheduler_config.json", "num_train_timesteps", "1000"),
     "num_train_timesteps"),
    ("scheduler timesteps negative", set_key("scheduler/scheduler_config.json", "num_train_timesteps", -5),
     "num_train_timesteps"),
    ("scheduler beta_start text", set_key("scheduler/scheduler_config.json", "beta_start", "x"), "beta_start"),
    ("scheduler beta_end above 1", set_key("scheduler/scheduler_config.json", "beta_end", 3), "beta_end"),
    ("scheduler prediction_type unknown", set_key("scheduler/scheduler_config.json", "prediction_type", "noise"),
     "prediction_type"),
    ("scheduler timestep_spacing unknown", set_key("scheduler/scheduler_config.json", "timestep_spacing", "x"),
     "timestep_spacing"),
    ("scheduler trained_betas text", set_key("scheduler/scheduler_config.json", "trained_betas", "x"), "trained_betas"),
    ("scheduler clip_sample a number", set_key("scheduler/scheduler_config.json", "clip_sample", 2), "clip_sample"),
    ("scheduler config a list", write("scheduler/scheduler_config.json", "[]"), "scheduler_config.json"),
    ("text encoder hidden_size text", set_key("text_encoder/config.json", "hidden_size", "32"), "hidden_size"),
    ("text encoder layers huge", set_key("text_encoder/config.json", "num_hidden_layers", 10**9), "num_hidden_layers"),
    ("text encoder more layers than weights", set_key("text_encoder/config.json", "num_hidden_layers", 3), "missing"),
    ("tokenizer max length text", set_key("tokenizer/tokenizer_config.json", "model_max_length", "77"),
     "model_max_length"),
    ("tokenizer not JSON", write("tokenizer/tokenizer.json", "{"), "tokenizer"),
    ("manifest a list", write("pocketdiff.json", "[]"), "pocketdiff.json"),
    ("manifest not JSON", write("pocketdiff.json", "{"), "pocketdiff.json"),
    ("manifest sampling a string", set_key("pocketdiff.json", "sampling", "x"), "'sampling'"),
    ("manifest sampling steps 0", set_key("pocketdiff.json", "sampling", {"steps": 0}), "sampling.steps"),
    ("manifest sampling unknown key", set_key("pocketdiff.json", "sampling", {"stepz": 4}), "sampling.stepz"),
    ("manifest passes a string", set_key("pocketdiff.json", "passes", "cast"), "'passes'"),
    ("manifest content_hash a number", set_key("pocketdiff.json", "content_hash", 5), "'content_hash'"),
    ("weights missing", lambda d: (d / UNET_W).unlink(), "no .safetensors"),
    ("weights truncated", header_lie(UNET_W, cut=100), "truncated"),
    ("weights with trailing bytes", header_lie(UNET_W, extra=b"\0" * 8), "after the last tensor"),
    ("header length 2**60", header_lie(UNET_W, length=2**60), "header"),
    ("header length past the end", header_lie(UNET_W, length=10**7), "header"),
    ("header not JSON", write(UNET_W, struct.pack("<Q", 4) + b"{x]}"), "not valid JSON"),
    ("header a list", write(UNET_W, struct.pack("<Q", 2) + b"[]"), "not a JSON object"),
    ("header too short", write(UNET_W, b"\x01\x02"), "too short"),
    ("offsets past the end", header_lie(UNET_W, lambda h: _first(h).update(data_offsets=[0, 10**12])), "tensor"),
    ("range past the end", header_lie(UNET_W, _past_end), "truncated"),
    ("overlapping ranges", header_lie(UNET_W, _overlap), "overlap"),
    ("dtype inconsistent with range", header_lie(UNET_W, lambda h: _first(h).update(dtype="F16")), "needs"),
    ("shape inconsistent with range", header_lie(UNET_W, lambda h: _first(h).update(shape=[3, 3])), "needs"),
    ("unknown dtype", header_lie(UNET_W, lambda h: _first(h).update(dtype="Q4")), "dtype"),
    ("negative offsets", header_lie(UNET_W, lambda h: _first(h).update(data_offsets=[-4, 0])), "data_offsets"),
    ("metadata a list", header_lie(UNET_W, lambda h: h.update(__metadata__=["x"])), "__metadata__"),
    ("metadata values not strings", header_lie(UNET_W, lambda h: h.update(__metadata__={"a": 1})), "__metadata__"),
    ("unet tensor removed", tensors(UNET_W, lambda s: s.pop("conv_out.bias")), "conv_out.bias"),
    ("unet tensor extra", tensors(UNET_W, lambda s: s.update(bogus=torch.zeros(2))), "bogus"),
    ("text encoder tensor removed", tensors("text_encoder/model.safetensors",
                                            lambda s: s.pop("final_layer_norm.weight")), "final_layer_norm.weight"),
    ("vae tensor removed", tensors("vae/diffusion_pytorch_model.safetensors",
                                   lambda s: s.pop("decoder.conv_out.weight")), "decoder.conv_out.weight"),
]


@pytest.mark.parametrize("edit,names", [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES])
def test_bad_model_folder(tiny_pipeline_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          edit: Edit, names: str) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_pipeline_dir, folder)
    edit(folder)
    assert_one_line(*run_cli(["info", str(folder)], capsys), 2, names)


def test_pickled_weights_never_run(tiny_pipeline_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A .bin in a folder, a .ckpt given as MODEL, a pickle renamed .safetensors: refused, the payload never runs."""
    marker = tmp_path / "pwned.txt"
    folder = tmp_path / "m"
    shutil.copytree(tiny_pipeline_dir, folder)
    pickled("unet/diffusion_pytorch_model.bin", marker, remove=UNET_W)(folder)
    assert_one_line(*run_cli(["info", str(folder)], capsys), 2, "pickled")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps(Payload(marker)))
    assert_one_line(*run_cli(["info", str(ckpt)], capsys), 2, "model.ckpt")
    renamed = tmp_path / "model.safetensors"
    torch.save({"x": Payload(marker)}, renamed)
    assert_one_line(*run_cli(["info", str(renamed)], capsys), 2, "model.safetensors")
    beside = tmp_path / "beside"
    shutil.copytree(tiny_pipeline_dir, beside)
    pickled("unet/diffusion_pytorch_model.bin", marker)(beside)
    assert run_cli(["info", str(beside)], capsys)[0] == 0  # the safetensors weights are read, the pickle never
    assert not marker.exists()
    pickle.loads(ckpt.read_bytes())  # the payload is real: unpickling it does write the file
    assert marker.read_text() == "pwned"


SINGLE_FILE_CASES: list[tuple[str, Callable[[dict], None], str]] = [
    ("no VAE", lambda s: [s.pop(k) for k in [k for k in s if k.startswith("first_stage_model.")]], "no VAE"),
    ("no U-Net", lambda s: [s.pop(k) for k in [k for k in s if k.startswith("model.diffusion_model.")]],
     "model.diffusion_model"),
    ("no text encoder", lambda s: [s.pop(k) for k in [k for k in s if k.startswith("cond_stage_model.")]],
     "text encoder"),
    ("one text-encoder tensor removed",
     lambda s: s.pop("cond_stage_model.transformer.text_model.final_layer_norm.bias"), "final_layer_norm.bias"),
    ("one U-Net tensor removed", lambda s: s.pop("model.diffusion_model.out.2.bias"), "model.diffusion_model.out.2.bias"),
    ("one VAE tensor removed", lambda s: s.pop("first_stage_model.decoder.conv_out.bias"),
     "first_stage_model.decoder.conv_out.bias"),
    ("U-Net tensor mis-shaped", lambda s: s.update({"model.diffusion_model.out.2.bias": torch.zeros(7)}),
     "mis-shaped (model.diffusion_model.out.2.bias: file [7], config [4])"),
    ("extra U-Net tensor", lambda s: s.update({"model.diffusion_model.extra.weight": torch.zeros(2)}),
     "1 unexpected (model.diffusion_model.extra.weight)"),
    ("SDXL", lambda s: s.update({"conditioner.embedders.0.x": torch.zeros(1)}), "SDXL"),
]


@pytest.mark.parametrize("change,names", [c[1:] for c in SINGLE_FILE_CASES], ids=[c[0] for c in SINGLE_FILE_CASES])
def test_single_file_with_parts_missing(tiny_pipeline_dir: Path, tiny_single_file: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], change: Callable[[dict], None],
                                        names: str) -> None:
    state = load_file(tiny_single_file)
    change(state)
    path = tmp_path / "ckpt.safetensors"
    save_file(state, str(path))
    code, err = run_cli(["info", str(path), "--model-config", str(tiny_pipeline_dir)], capsys)
    assert_one_line(code, err, 2, names)
    assert "ckpt.safetensors" in err


def test_single_file_python_api_never_returns_a_half_loaded_model(tiny_pipeline_dir: Path,
                                                                  tiny_single_file: Path, tmp_path: Path) -> None:
    from pocketdiff.errors import ConfigError
    from pocketdiff.single_file import load_single_file

    whole = load_single_file(tiny_single_file, tiny_pipeline_dir)
    assert not any(t.is_meta for m in whole.modules().values() for t in [*m.parameters(), *m.buffers()])
    state = load_file(tiny_single_file)
    state.pop("cond_stage_model.transformer.text_model.encoder.layers.0.layer_norm1.weight")
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ConfigError, match=r"text encoder: .*1 missing \(cond_stage_model\..*layer_norm1\.weight\)"):
        load_single_file(tmp_path / "cut.safetensors", tiny_pipeline_dir)


def test_open_clip_names_are_the_inverse_of_diffusers_conversion() -> None:
    """SD2.x checkpoints are checked by the names diffusers' own OpenCLIP conversion reads."""
    import transformers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from pocketdiff.single_file import open_clip_to_ldm

    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64,
                                                                   num_hidden_layers=2, num_attention_heads=4))
    state = model.state_dict()
    back = convert_open_clip_checkpoint(model, open_clip_to_ldm(state))
    assert back.keys() == {"text_model." + k for k in state}
    assert all(torch.equal(back["text_model." + k], v) for k, v in state.items())


def _artifacts(change: Callable[[dict], None]) -> Edit:
    def edit(d: Path) -> None:
        data = json.loads((d / "artifacts.json").read_text())
        change(data)
        (d / "artifacts.json").write_text(json.dumps(data))
    return edit


ARTIFACT_CASES: list[tuple[str, Edit, str]] = [
    ("manifest a list", write("artifacts.json", "[]"), "artifacts.json"),
    ("manifest not JSON", write("artifacts.json", "{"), "artifacts.json"),
    ("no artifacts key", _artifacts(lambda a: a.pop("artifacts")), "artifacts is missing"),
    ("artifacts an object", _artifacts(lambda a: a.update(artifacts={})), "artifacts must be a JSON list"),
    ("model a number", _artifacts(lambda a: a.update(model=3)), "model must be"),
    ("model_hash a number", _artifacts(lambda a: a.update(model_hash=3)), "model_hash"),
    ("sampler a list", _artifacts(lambda a: a.update(sampler=[])), "sampler"),
    ("entry a string", _artifacts(lambda a: a["artifacts"].__setitem__(0, "x")), "artifacts[0]"),
    ("entry without path", _artifacts(lambda a: a["artifacts"][1].pop("path")), "artifacts[1].path is missing"),
    ("path a number", _artifacts(lambda a: a["artifacts"][1].update(path=5)), "artifacts[1].path"),
    ("path absolute", _artifacts(lambda a: a["artifacts"][0].update(path="/etc/hostname")), "artifacts[0].path"),
    ("path with ..", _artifacts(lambda a: a["artifacts"][0].update(path="../../x.onnx")), "artifacts[0].path"),
    ("unknown component", _artifacts(lambda a: a["artifacts"][0].update(component="safety")), "artifacts[0].component"),
    ("unknown precision", _artifacts(lambda a: a["artifacts"][0].update(precision="int3")), "artifacts[0].precision"),
    ("inputs a list", _artifacts(lambda a: a["artifacts"][0].update(inputs=[])), "artifacts[0].inputs"),
    ("input without dtype", _artifacts(lambda a: a["artifacts"][0]["inputs"]["input_ids"].pop("dtype")),
     "artifacts[0].inputs.input_ids"),
    ("shapes with a zero", _artifacts(lambda a: a["artifacts"][0].update(shapes=[{"input_ids": [0, 77]}])),
     "artifacts[0].shapes[0]"),
    ("unknown entry key", _artifacts(lambda a: a["artifacts"][0].update(colour=1)), "colour"),
    ("artifact file missing", lambda d: (d / "onnx/unet/model.onnx").unlink(), "unet"),
    ("artifact file garbage", write("onnx/vae_decoder/model.onnx", b"\x08garbage"), "vae_decoder"),
    ("artifact file truncated", lambda d: (d / "onnx/unet/model.onnx").write_bytes(
        (d / "onnx/unet/model.onnx").read_bytes()[:5000]), "unet"),
    ("artifact file empty", write("onnx/text_encoder/model.onnx", b""), "text_encoder"),
]


@pytest.mark.parametrize("edit,names", [c[1:] for c in ARTIFACT_CASES], ids=[c[0] for c in ARTIFACT_CASES])
def test_bad_artifacts_fail_validate_in_seconds(tiny_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], edit: Edit, names: str) -> None:
    from pocketdiff.runtimes import harness

    def no_sampling(*args: object, **kwargs: object) -> None:
        raise AssertionError("a reference image was generated before the artifacts were checked")
    monkeypatch.setattr(harness, "generate", no_sampling)
    folder = tmp_path / "a"
    shutil.copytree(tiny_artifacts, folder)
    edit(folder)
    assert_one_line(*run_cli(["validate", str(folder)], capsys), 2, names)


def test_planted_fault_fails_the_gate_with_exit_1(tiny_artifacts: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    from onnx import numpy_helper

    folder = tmp_path / "f"
    shutil.copytree(tiny_artifacts, folder)
    path = folder / "onnx" / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    (init,) = [t for t in model.graph.initializer if t.name == "vae.decoder.up_blocks.0.resnets.0.conv1.weight"]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
    onnx.save(model, str(path))
    code, err = run_cli(["validate", str(folder), "--steps", "2"], capsys)
    assert_one_line(code, err, 1, "failing component(s): vae_decoder (rel L2")
    assert "vae.decoder.up_blocks.0.resnets.0.conv1" in err

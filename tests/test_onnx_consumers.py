"""The ONNX folder as consumers load it unchanged: diffusers' OnnxStableDiffusionPipeline, the shipped plain
onnxruntime script, its manifest and tokenizer files, the standard-op attention setting, file modes and paths.

The model is arch:tiny with a masked BERT text encoder and a VAE scaling factor other than 0.18215, so the
derived attention mask and the latent rescale are exercised. Images must match `pocketdiff generate`
to 1/255 (one 8-bit level).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers

from pocketdiff.errors import ConfigError
from pocketdiff.export.base import ArtifactSet, ExportOptions, export_bundle
from pocketdiff.export.components import example_inputs, wrap
from pocketdiff.export.folder import FOLDER_MANIFEST
from pocketdiff.runtimes.harness import ValidateConfig, validate
from pocketdiff.sampler import SampleConfig, generate, initial_latents, to_uint8
from pocketdiff.zoo import build_arch

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
PROMPT = "a photo of a sneaker"
SAMPLING = SampleConfig(steps=3, guidance_scale=7.5, seed=0)
TOLERANCE = 1  # 8-bit levels


@pytest.fixture(scope="module")
def bundle():
    """arch:tiny with a masked BERT encoder (the built-in's kind) and a VAE scaling factor of 0.5."""
    b = build_arch("tiny", seed=0)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=b.tokenizer.vocab_size, max_position_embeddings=77)
    b.text_encoder = transformers.BertModel(cfg).eval()
    b.text_encoder.config.use_attention_mask = True
    b.vae.register_to_config(scaling_factor=0.5)
    return b


@pytest.fixture(scope="module")
def folder(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("consumers") / "art"
    before = os.umask(0o022)
    try:
        export_bundle(bundle, str(out.parent / "my-model"), ["onnx"], ExportOptions(components=ALL), out)
    finally:
        os.umask(before)
    return out


@pytest.fixture(scope="module")
def reference(bundle):
    """`pocketdiff generate`'s image for PROMPT as uint8 [H, W, 3], and its starting noise."""
    hw = (bundle.resolution // bundle.vae_scale_factor,) * 2
    image = to_uint8(generate(bundle, [PROMPT], SAMPLING, progress=False))[0].numpy()
    return image, initial_latents(1, bundle.unet.config.in_channels, hw, SAMPLING.seed).numpy()


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.std() > 5  # a real image, not a constant one
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_diffusers_onnx_pipeline_loads_the_folder_and_matches_generate(folder, bundle, reference):
    from diffusers import OnnxStableDiffusionPipeline

    image, noise = reference
    pipe = OnnxStableDiffusionPipeline.from_pretrained(folder / "onnx", provider="CPUExecutionProvider")
    pipe.set_progress_bar_config(disable=True)
    side = noise.shape[-1] * 8  # the pipeline sizes latents as height // 8
    out = pipe(PROMPT, num_inference_steps=SAMPLING.steps, guidance_scale=SAMPLING.guidance_scale, height=side,
               width=side, latents=noise, output_type="np").images[0]
    assert _max_diff((out * 255).round().astype(np.uint8), image) <= TOLERANCE


def test_example_script_reproduces_generate_from_the_folder_alone(folder, reference, tmp_path):
    image, noise = reference
    alone = shutil.copytree(folder / "onnx", tmp_path / "app")  # only the ONNX folder, moved elsewhere
    np.save(tmp_path / "noise.npy", noise)
    blocked = "import runpy, sys; sys.modules['pocketdiff'] = sys.modules['torch'] = None; " \
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    run = subprocess.run([sys.executable, "-c", blocked, str(alone / "generate.py"), "--prompt", PROMPT,
                          "--noise", str(tmp_path / "noise.npy"), "--steps", str(SAMPLING.steps),
                          "--guidance-scale", str(SAMPLING.guidance_scale), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    from PIL import Image

    assert _max_diff(np.asarray(Image.open(tmp_path / "x.png")), image) <= TOLERANCE


def test_manifest_matches_the_graphs_and_the_folder(folder, bundle):
    root = folder / "onnx"
    manifest = json.loads((root / FOLDER_MANIFEST).read_text())
    assert set(manifest["graphs"]) == set(ALL)
    for comp, graph in manifest["graphs"].items():
        sess = ort.InferenceSession(str(root / graph["path"]), providers=["CPUExecutionProvider"])
        real = {i.name: (i.type, len(i.shape)) for i in sess.get_inputs()}
        assert real == {n: (f"tensor({'float' if d['dtype'] == 'float32' else d['dtype']})", len(d["shape"]))
                        for n, d in graph["inputs"].items()}, comp
        assert [o.name for o in sess.get_outputs()] == list(graph["outputs"])
    text = manifest["graphs"]["text_encoder"]
    assert text["inputs"] == {"input_ids": {"dtype": "int32", "shape": ["batch", 77]}}
    assert text["outputs"]["last_hidden_state"]["shape"] == ["batch", 77, 32]
    assert manifest["graphs"]["unet"]["inputs"]["timestep"] == {"dtype": "float32", "shape": ["timestep_batch"]}
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert manifest["scheduler"]["type"] == scheduler["_class_name"] == "DDIMScheduler"
    assert {k: v for k, v in scheduler.items() if not k.startswith("_")} == \
        {k: v for k, v in manifest["scheduler"]["config"].items() if not k.startswith("_")}
    assert manifest["sampling"] == {"steps": 50, "guidance_scale": 7.5, "negative_prompt": "",
                                    "source": "pocketdiff generate's defaults"}
    assert manifest["latents"]["scaling_factor"] == 0.5 and manifest["latents"]["decoder_divisor"] == 0.18215
    assert manifest["graphs"]["vae_decoder"]["interface"]["latent_rescale"] == pytest.approx(0.5 / 0.18215)
    assert json.loads((root / "vae_decoder" / "config.json").read_text())["scaling_factor"] == 0.18215
    assert manifest["resolutions"] == {"native": 16, "exported": [16], "multiple": 4}
    assert manifest["versions"]["onnxruntime"] == ort.__version__ and manifest["versions"]["pocketdiff"]
    readme = (root / "README.md").read_text()
    assert "0.18215" in readme and "DDIMScheduler" in readme and "generate.py" in readme and "height=64" in readme


def test_tokenizer_files_load_as_the_index_names_them(folder, bundle):
    root = folder / "onnx"
    library, name = json.loads((root / "model_index.json").read_text())["tokenizer"]
    assert (library, name) == ("transformers", "BertTokenizerFast")
    from tokenizers.implementations import BertWordPieceTokenizer

    prompts = [PROMPT, "zebra-striped boots"]
    named = getattr(transformers, name).from_pretrained(root / "tokenizer")
    from_vocab = BertWordPieceTokenizer(str(root / "tokenizer" / "vocab.txt"), lowercase=True)  # what slow classes read
    want = bundle.tokenizer(prompts).input_ids
    assert named(prompts).input_ids == [e.ids for e in from_vocab.encode_batch(prompts)] == want


def test_pocketdiff_runtime_validates_the_adapted_graphs(folder, bundle):
    report = validate(folder, bundle=bundle, config=ValidateConfig(steps=2), progress=False)
    target = report["targets"][0]
    assert target["status"] == "passed", target
    for comp in ALL:
        assert max(r["rel_l2"] for r in target["components"][comp]["parity"]) < 1e-4, comp


def test_standard_op_attention_matches_pytorch(tiny, tmp_path):
    aset = export_bundle(tiny, "arch:tiny", ["onnx"], ExportOptions(components=("unet", "vae_decoder"), batch_sizes=(2,),
                                                                    extra={"onnx_attention": "softmax"}), tmp_path / "s")
    for art in aset.artifacts:
        model = onnx.load(str(tmp_path / "s" / art.path))
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        assert art.details["attention_form"] == "softmax" and art.details["fused_attention"] == 0
        assert [n.op_type for n in model.graph.node].count("Softmax") == (8 if art.component == "unet" else 1)
        sess = ort.InferenceSession(str(tmp_path / "s" / art.path), providers=["CPUExecutionProvider"])
        spec = wrap(tiny, art.component)
        feeds = example_inputs(tiny, art.component, 2, seed=1)
        with torch.no_grad():
            ref = spec.module(**feeds).numpy()
        out = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        assert np.abs(out - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))
    with pytest.raises(ConfigError, match="softmax"):
        export_bundle(tiny, "arch:tiny", ["onnx"], ExportOptions(components=("unet",), extra={"onnx_attention": "mha"}),
                      tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_files_are_0644_and_hold_no_build_machine_paths(folder):
    modes = {p.relative_to(folder): p.stat().st_mode & 0o777 for p in folder.rglob("*")}
    assert {m for p, m in modes.items() if (folder / p).is_file()} == {0o644}
    assert {m for p, m in modes.items() if (folder / p).is_dir()} == {0o755}
    # the model came from a folder on this machine (folder.parent / "my-model"); the app's folder is onnx/
    forbidden = [str(folder.parent), str(Path.home()), str(Path(__file__).resolve().parents[1]), sys.prefix]
    for path in (folder / "onnx").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [f for f in forbidden if f.encode() in data], path
    assert json.loads((folder / "onnx" / FOLDER_MANIFEST).read_text())["model"] == "my-model"

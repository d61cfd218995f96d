"""An exported ONNX folder in its consumers vs `pocketdiff generate`: the max pixel difference (8-bit levels) of
diffusers' OnnxStableDiffusionPipeline and of the folder's own generate.py, same prompt, seed, steps, guidance.

    .venv/bin/python -m pocketdiff export fashion --targets onnx --out /tmp/fashion-onnx
    .venv/bin/python -m pocketdiff generate fashion -p "a photo of a sneaker" --seed 0 --out /tmp/fashion-gen
    .venv/bin/python bench/onnx_consumers.py /tmp/fashion-onnx --model fashion --reference /tmp/fashion-gen/0000_seed0.png

Steps and guidance default to the folder's manifest (what `pocketdiff generate` uses for the model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a folder written by `pocketdiff export --targets onnx`")
    p.add_argument("--model", default="fashion", help="the model the folder was exported from")
    p.add_argument("--prompt", default="a photo of a sneaker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", type=Path, default=None,
                   help="the PNG `pocketdiff generate MODEL -p PROMPT --seed SEED` wrote (default: generate here)")
    args = p.parse_args()

    from diffusers import OnnxStableDiffusionPipeline

    from pocketdiff.sampler import SampleConfig, generate, initial_latents, to_uint8
    from pocketdiff.sources import load_model

    root = args.folder / "onnx"
    manifest = json.loads((root / "manifest.json").read_text())
    steps, guidance = manifest["sampling"]["steps"], manifest["sampling"]["guidance_scale"]
    bundle = load_model(args.model)
    lat = manifest["latents"]
    side = manifest["resolutions"]["native"] // lat["vae_scale_factor"]
    noise = initial_latents(1, lat["channels"], (side, side), args.seed).numpy()
    start = time.perf_counter()
    reference = (np.asarray(Image.open(args.reference)).astype(int) if args.reference else
                 to_uint8(generate(bundle, [args.prompt], SampleConfig.for_bundle(bundle, seed=args.seed),
                                   progress=False))[0].numpy().astype(int))
    print(f"pocketdiff generate ({manifest['scheduler']['type']}, {steps} steps, guidance {guidance}): "
          f"{args.reference or f'{time.perf_counter() - start:.1f} s'}")

    pipe = OnnxStableDiffusionPipeline.from_pretrained(root, provider="CPUExecutionProvider")
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    image = pipe(args.prompt, num_inference_steps=steps, guidance_scale=guidance, height=side * 8, width=side * 8,
                 latents=noise, output_type="np").images[0]
    diffusers_px = (image * 255).round().astype(int)
    print(f"diffusers OnnxStableDiffusionPipeline: max pixel difference {np.abs(diffusers_px - reference).max()}/255, "
          f"mean {np.abs(diffusers_px - reference).mean():.4f}, {time.perf_counter() - start:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "noise.npy", noise)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(root / "generate.py"), "--prompt", args.prompt, "--noise",
                        str(Path(tmp) / "noise.npy"), "--out", str(Path(tmp) / "x.png")], check=True,
                       stdout=subprocess.DEVNULL)
        script_px = np.asarray(Image.open(Path(tmp) / "x.png")).astype(int)
    print(f"generate.py (numpy + onnxruntime + tokenizers): max pixel difference "
          f"{np.abs(script_px - reference).max()}/255, mean {np.abs(script_px - reference).mean():.4f}, "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

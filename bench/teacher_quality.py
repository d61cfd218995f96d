"""Teacher quality on the Fashion-MNIST yardstick: the headline figure, the real-data floor, and
the autoencoder floor (real images through the VAE), the training-free baseline table (FID / prompt accuracy per scheduler and step count).

Writes JSON (updated after every section, so a cut-off run keeps what it finished) and a grid PNG.
Usage (GPU host, captions precomputed here because MiniLM's weights do not travel):
  python bench/teacher_quality.py --model DIR --captions-cache FILE --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pocketdiff.bundle import Bundle
from pocketdiff.data import CLASSES, class_prompts
from pocketdiff.evaluate import Yardstick, autoencoder_floor, evaluate, real_images
from pocketdiff.fileio import atomic_write_json
from pocketdiff.metrics.classifier import prompt_accuracy
from pocketdiff.sampler import CachedTextComponents, SampleConfig, TorchComponents, generate, to_pil
from pocketdiff.data import load_fashion_mnist
from pocketdiff.sources import load_model
from pocketdiff.teacher.train import caption_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fashion")
    ap.add_argument("--captions-cache", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--classifier", type=Path, default=None, help="classifier weights (default: shipped)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=10_000, help="samples for the headline figure")
    ap.add_argument("--table-samples", type=int, default=2_000, help="samples per baseline-table cell")
    ap.add_argument("--guidance", type=float, nargs="+", default=[2.0, 4.0, 7.5], help="guidance scales to sweep")
    ap.add_argument("--sweep-samples", type=int, default=1_000)
    ap.add_argument("--steps", type=int, nargs="*", default=[1, 2, 4, 8, 25, 50], help="table step counts (none: no table)")
    ap.add_argument("--schedulers", nargs="+", default=["ddim", "dpmsolver++", "euler"])
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--unet-dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                    help="U-Net and VAE dtype when sampling on a GPU (fp16: as the weights ship)")
    ap.add_argument("--reference-samples", type=int, default=None, help="real images per side (default: all 10,000)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.unet_dtype] \
        if device == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False  # Inception in true fp32
    bundle = Bundle.load(args.model) if Path(args.model).is_dir() else load_model(args.model)
    bundle.to(device, dtype)
    components = (CachedTextComponents(bundle, caption_table(args.captions_cache), device, dtype)
                  if bundle.text_encoder is None else TorchComponents(bundle, device, dtype))
    yard = Yardstick.load(device, reference_n=args.reference_samples, data_root=args.data,
                          classifier=args.classifier)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "unet_dtype": str(dtype), "model": args.model, "date": time.strftime("%Y-%m-%d")}

    def save() -> None:
        atomic_write_json(args.out / "teacher_quality.json", report)

    _, test_y = load_fashion_mnist("test", args.data)
    report["classifier_test_accuracy"] = prompt_accuracy(yard.classifier, real_images("test", None, args.data),
                                                         torch.as_tensor(test_y))
    n_floor = args.reference_samples or 10_000
    report["floor"] = {"what": f"real train (first {n_floor}) vs real test", **yard.score(real_images("train", n_floor, args.data))}
    report["vae_floor"] = autoencoder_floor(bundle, yard, n_floor, args.data)
    print("floor", report["floor"], "vae floor", report["vae_floor"], "classifier", report["classifier_test_accuracy"],
          flush=True)
    save()

    report["guidance_sweep"] = []
    for g in args.guidance:
        r = evaluate(bundle, yard, args.sweep_samples, SampleConfig(steps=50, scheduler="ddim", guidance_scale=g,
                     batch_size=args.batch_size), components, progress=False)
        report["guidance_sweep"].append(r)
        print("sweep", g, r, flush=True)
        save()
    best = min(report["guidance_sweep"], key=lambda r: r["fid"])["guidance_scale"]

    head_cfg = SampleConfig(steps=50, scheduler="ddim", guidance_scale=best, batch_size=args.batch_size)
    report["headline"] = evaluate(bundle, yard, args.samples, head_cfg, components, progress=False)
    print("headline", report["headline"], flush=True)
    save()

    prompts, _ = class_prompts(8)
    prompts = sorted(prompts, key=lambda p: [c in p for c in CLASSES].index(True))
    grid = generate(bundle, prompts, head_cfg, components, progress=False)
    pil = to_pil(grid)
    w, h = pil[0].size
    from PIL import Image

    canvas = Image.new("RGB", (8 * w, len(CLASSES) * h))
    for i, im in enumerate(pil):
        canvas.paste(im, ((i % 8) * w, (i // 8) * h))
    canvas.save(args.out / "teacher_grid.png")

    report["table"] = []
    for sched in args.schedulers:
        for steps in args.steps:
            cfg = SampleConfig(steps=steps, scheduler=sched, guidance_scale=best, batch_size=args.batch_size)
            r = evaluate(bundle, yard, args.table_samples, cfg, components, progress=False)
            report["table"].append(r)
            print("table", sched, steps, round(r["fid"], 2), round(r["prompt_accuracy"], 4), flush=True)
            save()
    print(json.dumps({k: report[k] for k in ("floor", "vae_floor", "headline")}, indent=1))


if __name__ == "__main__":
    main()

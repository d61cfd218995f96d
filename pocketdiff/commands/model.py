"""`pocketdiff info`, `generate` and `eval`: what a model costs, what it draws, how well."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from . import Handler, command, emit, int_range, path_arg, sample_value
from ..errors import ConfigError
from ..sampler import MAX_SIDE
from ..sources import DEFAULT_MODEL

IMAGES_MANIFEST = "images.json"  # marks a `generate` output folder (prompts, seeds, sampling settings)
MAX_IMAGES = 10_000  # per prompt
# Sampling when neither the flags nor the model's own settings (a distilled student's) say.
GENERATE_FALLBACK = {"steps": 50, "scheduler": "ddim", "guidance_scale": 7.5}
EVAL_FALLBACK = {"steps": 50, "scheduler": "ddim", "guidance_scale": 4.0}


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="'fashion' (built-in), arch:sd15|sd21|sdxl|tiny, a diffusers folder or a .safetensors file")
    p.add_argument("--model-config", type=path_arg, default=None,
                   help="diffusers config folder for a single-file checkpoint (default: SD1.5/SD2.1 from the zoo)")


@command("info", "parameters, MACs per call and weight bytes of each component")
def _info(p: argparse.ArgumentParser) -> Handler:
    _model_arg(p)
    p.add_argument("--resolution", type=int_range(1, MAX_SIDE), default=None, help="image side in pixels (default: native)")

    def run(args: argparse.Namespace) -> None:
        from ..costs import measure_costs
        from ..sources import load_model

        bundle = load_model(args.model, shapes_only=True, config=args.model_config)
        costs = measure_costs(bundle, args.resolution)
        res = args.resolution or bundle.resolution
        rows = [f"{args.model} at {res}x{res} (batch 1, 77 text tokens)",
                f"{'component':<14}{'params':>14}{'GMACs/call':>12}{'weights-only':>14}{'fp32 MB':>10}"
                f"{'fp16 MB':>10}{'int8 MB':>10}"]
        for c in costs:
            rows.append(f"{c.component:<14}{c.params:>14,}{c.macs / 1e9:>12.2f}{c.weight_macs / 1e9:>14.2f}"
                        f"{c.bytes_at['float32'] / 1e6:>10.1f}{c.bytes_at['float16'] / 1e6:>10.1f}"
                        f"{c.bytes_at['int8'] / 1e6:>10.1f}")
        rows.append("GMACs/call counts every multiply-accumulate; weights-only leaves out attention's "
                    "QK^T and AV products (the convention of published figures).")
        emit(args, {"model": args.model, "resolution": res, "components": [c.as_dict() for c in costs]},
             "\n".join(rows))
    return run


def _sampling_args(p: argparse.ArgumentParser, fallback: dict[str, object], batch_size: int) -> None:
    """--steps, --scheduler, --guidance-scale (default: the model's own sampling settings, else `fallback`),
    --seed and --batch-size, each checked as SampleConfig checks it."""
    from ..schedulers import scheduler_names

    own = "default: the model's own setting, else "
    p.add_argument("--steps", type=sample_value("steps", int), default=None, help=f"{own}{fallback['steps']}")
    p.add_argument("--scheduler", choices=scheduler_names(), default=None, help=f"{own}{fallback['scheduler']}")
    p.add_argument("--guidance-scale", type=sample_value("guidance_scale", float), default=None,
                   help=f"{own}{fallback['guidance_scale']}")
    p.add_argument("--seed", type=sample_value("seed", int), default=0, help="seed of the first image")
    p.add_argument("--batch-size", type=sample_value("batch_size", int), default=batch_size)


@command("generate", "text-to-image with the PyTorch reference sampler; writes PNGs")
def _generate(p: argparse.ArgumentParser) -> Handler:
    _model_arg(p)
    p.add_argument("-p", "--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("-n", "--num-images", type=int_range(1, MAX_IMAGES), default=1, help="images per prompt")
    p.add_argument("--negative-prompt", default="")
    _sampling_args(p, GENERATE_FALLBACK, batch_size=8)
    p.add_argument("--height", type=sample_value("height", int), default=None)
    p.add_argument("--width", type=sample_value("width", int), default=None)
    p.add_argument("--out", type=path_arg, default=Path("outputs"),
                   help=f"folder for the PNGs and {IMAGES_MANIFEST} (replaced as a whole, atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace --out even if it is not an earlier `generate` folder (no {IMAGES_MANIFEST})")

    def run(args: argparse.Namespace) -> None:
        from ..fileio import atomic_dir, atomic_write_json, prepare_output_dir
        from ..sampler import SampleConfig, generate, save_pngs
        from ..sources import load_model

        out = prepare_output_dir(args.out, IMAGES_MANIFEST, args.overwrite)
        bundle = load_model(args.model, config=args.model_config)
        prompts = [pr for pr in args.prompt for _ in range(args.num_images)]
        cfg = SampleConfig.for_bundle(bundle, fallback=GENERATE_FALLBACK, steps=args.steps, scheduler=args.scheduler,
                                      guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                                      seed=args.seed, height=args.height, width=args.width,
                                      batch_size=args.batch_size)
        images = generate(bundle, prompts, cfg, progress=not args.json)
        with atomic_dir(out) as tmp:
            names = save_pngs(images, tmp, cfg.seed)
            atomic_write_json(tmp / IMAGES_MANIFEST, {"model": args.model, "sampling": asdict(cfg),
                                                      "images": [{"file": n, "prompt": pr, "seed": cfg.seed + i}
                                                                 for i, (n, pr) in enumerate(zip(names, prompts))]})
        paths = [str(args.out / n) for n in names]
        emit(args, {"images": paths, "prompts": prompts, "sampling": asdict(cfg)}, "\n".join(paths))
    return run


@command("eval", "FID, KID and prompt accuracy on the Fashion-MNIST yardstick, with the real-data floor")
def _eval(p: argparse.ArgumentParser) -> Handler:
    _model_arg(p)
    p.add_argument("--samples", type=int_range(1), default=1000,
                   help="generated images (reported figures use 10,000; at most the 60,000 train images)")
    _sampling_args(p, EVAL_FALLBACK, batch_size=50)
    p.add_argument("--reference-samples", type=int_range(1), default=10_000,
                   help="real test images the FID is measured against (features cached after the first run)")
    p.add_argument("--reference", default=None, help="a second MODEL: also report PSNR/SSIM against its images")
    p.add_argument("--data", type=path_arg, default=None, help="folder of the Fashion-MNIST idx files")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")

    def run(args: argparse.Namespace) -> None:
        from ..data import data_root, split_info
        from ..devices import resolve_device
        from ..evaluate import REPORTED_SAMPLES, Yardstick, agreement, evaluate, floor
        from ..sampler import SampleConfig
        from ..sources import load_model

        device = resolve_device(args.device)
        for flag, n, split in (("--reference-samples", args.reference_samples, "test"),
                               ("--samples", args.samples, "train")):
            available, _ = split_info(split, args.data)
            if n > available:
                raise ConfigError(f"{flag} {n:,}: the {split} set in {data_root(args.data)} has {available:,} images")
        bundle = load_model(args.model, config=args.model_config).to(device)
        reference = load_model(args.reference).to(device) if args.reference else None
        cfg = SampleConfig.for_bundle(bundle, fallback=EVAL_FALLBACK, steps=args.steps, scheduler=args.scheduler,
                                      guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size)
        yard = Yardstick.load(device, reference_n=args.reference_samples, data_root=args.data)
        real_floor = floor(yard, args.samples, args.data)
        result = evaluate(bundle, yard, args.samples, cfg, progress=not args.json)
        result["floor"] = real_floor
        result["quick_check"] = min(args.samples, args.reference_samples) < REPORTED_SAMPLES
        if reference is not None:
            result["agreement"] = agreement(bundle, reference, args.samples, cfg, progress=not args.json)
        label = " (quick check: reported figures use 10,000 samples)" if result["quick_check"] else ""
        text = [f"{args.model}: {result['samples']} samples{label}, {cfg.scheduler} x{cfg.steps}, "
                f"guidance {cfg.guidance_scale}",
                f"FID {result['fid']:.2f} (real-data floor at this count {result['floor']['fid']:.2f}), "
                f"KID {result['kid']:.4f}, prompt accuracy {result['prompt_accuracy']:.3f}"]
        if "agreement" in result:
            a = result["agreement"]
            text.append(f"vs {args.reference}: PSNR {a['psnr_db']:.2f} dB, SSIM {a['ssim']:.4f}")
        emit(args, result, "\n".join(text))
    return run

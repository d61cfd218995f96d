"""`pocketdiff info`, `generate` and `eval`: what a model costs, what it draws, how well."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import Handler, command, emit, path_arg
from ..sources import DEFAULT_MODEL


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="'fashion' (built-in), arch:sd15|sd21|sdxl|tiny, a diffusers folder or a .safetensors file")
    p.add_argument("--model-config", type=path_arg, default=None,
                   help="diffusers config folder for a single-file checkpoint (default: SD1.5/SD2.1 from the zoo)")


@command("info", "parameters, MACs per call and weight bytes of each component")
def _info(p: argparse.ArgumentParser) -> Handler:
    _model_arg(p)
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: native)")

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


@command("generate", "text-to-image with the PyTorch reference sampler; writes PNGs")
def _generate(p: argparse.ArgumentParser) -> Handler:
    from ..schedulers import scheduler_names

    _model_arg(p)
    p.add_argument("-p", "--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", choices=scheduler_names(), default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=path_arg, default=Path("outputs"), help="folder for the PNGs")

    def run(args: argparse.Namespace) -> None:
        from ..sampler import SampleConfig, generate, to_pil
        from ..sources import load_model
        from ..fileio import atomic_write_bytes

        bundle = load_model(args.model, config=args.model_config)
        prompts = [pr for pr in args.prompt for _ in range(args.num_images)]
        cfg = SampleConfig(steps=args.steps, scheduler=args.scheduler, guidance_scale=args.guidance_scale,
                           negative_prompt=args.negative_prompt, seed=args.seed, height=args.height,
                           width=args.width, batch_size=args.batch_size)
        images = generate(bundle, prompts, cfg, progress=not args.json)
        paths = []
        for i, img in enumerate(to_pil(images)):
            path = args.out / f"{i:04d}_seed{args.seed + i}.png"
            import io

            buf = io.BytesIO()
            img.save(buf, format="PNG")
            atomic_write_bytes(path, buf.getvalue())
            paths.append(str(path))
        emit(args, {"images": paths, "prompts": prompts}, "\n".join(paths))
    return run


@command("eval", "FID, KID and prompt accuracy on the Fashion-MNIST yardstick, with the real-data floor")
def _eval(p: argparse.ArgumentParser) -> Handler:
    from ..schedulers import scheduler_names

    _model_arg(p)
    p.add_argument("--samples", type=int, default=1000, help="generated images (reported figures use 10,000)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", choices=scheduler_names(), default="ddim")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--reference-samples", type=int, default=10_000,
                   help="real test images the FID is measured against (features cached after the first run)")
    p.add_argument("--reference", default=None, help="a second MODEL: also report PSNR/SSIM against its images")
    p.add_argument("--data", type=path_arg, default=None, help="folder of the Fashion-MNIST idx files")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")

    def run(args: argparse.Namespace) -> None:
        import torch

        from ..evaluate import REPORTED_SAMPLES, Yardstick, agreement, evaluate, floor
        from ..sampler import SampleConfig
        from ..sources import load_model

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        bundle = load_model(args.model, config=args.model_config).to(device)
        cfg = SampleConfig(steps=args.steps, scheduler=args.scheduler, guidance_scale=args.guidance_scale,
                           seed=args.seed, batch_size=args.batch_size)
        yard = Yardstick.load(device, reference_n=args.reference_samples, data_root=args.data)
        result = evaluate(bundle, yard, args.samples, cfg, progress=not args.json)
        result["floor"] = floor(yard, args.samples, args.data)
        result["quick_check"] = min(args.samples, args.reference_samples) < REPORTED_SAMPLES
        if args.reference:
            result["agreement"] = agreement(bundle, load_model(args.reference).to(device), args.samples, cfg,
                                            progress=not args.json)
        label = " (quick check: reported figures use 10,000 samples)" if result["quick_check"] else ""
        text = [f"{args.model}: {result['samples']} samples{label}, {args.scheduler} x{args.steps}, "
                f"guidance {args.guidance_scale}",
                f"FID {result['fid']:.2f} (real-data floor at this count {result['floor']['fid']:.2f}), "
                f"KID {result['kid']:.4f}, prompt accuracy {result['prompt_accuracy']:.3f}"]
        if "agreement" in result:
            a = result["agreement"]
            text.append(f"vs {args.reference}: PSNR {a['psnr_db']:.2f} dB, SSIM {a['ssim']:.4f}")
        emit(args, result, "\n".join(text))
    return run

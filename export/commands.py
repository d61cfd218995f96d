"""`pocketdiff export` and `pocketdiff validate`: thin layers over export_bundle and the harness."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..commands import Handler, command, emit, int_range, path_arg, sample_value
from ..sampler import MAX_SIDE
from ..sources import DEFAULT_MODEL
from .base import MANIFEST


MAX_EXPORT_BATCH = 64


def _csv(value: str) -> list[str]:
    """argparse type: a comma-separated list, at least one item, none twice."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}")
    twice = sorted({v for v in items if items.count(v) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{twice[0]!r} is listed twice")
    return items


def _ints(lo: int, hi: int) -> Callable[[str], tuple[int, ...]]:
    """argparse type: comma-separated integers, each in [lo, hi]."""
    one = int_range(lo, hi)

    def convert(value: str) -> tuple[int, ...]:
        return tuple(one(v) for v in _csv(value))
    return convert


@command("export", "export the text encoder, U-Net and VAE to ONNX / Core ML / ExecuTorch artifacts")
def _export(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="'fashion' (built-in), arch:sd15|sd21|sdxl|tiny or a diffusers folder")
    p.add_argument("--targets", type=_csv, default=["onnx"], help="comma-separated: onnx,coreml,executorch")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--components", type=_csv, default=["text_encoder", "unet", "vae_decoder", "vae_encoder"],
                   help="comma-separated components to export")
    p.add_argument("--batch-sizes", type=_ints(1, MAX_EXPORT_BATCH), default=(1, 2),
                   help="batch sizes to export and validate for")
    p.add_argument("--resolutions", type=_ints(1, MAX_SIDE), default=(), help="image sides in pixels (default: native)")
    p.add_argument("--deployment-target", default="iOS18", help="Core ML: iOS16, iOS17 or iOS18")
    p.add_argument("--executorch-delegate", choices=["xnnpack", "coreml"], default="xnnpack",
                   help="ExecuTorch: XNNPACK (CPU, runs here) or Core ML (lowers here, runs on Apple devices)")
    p.add_argument("--winograd", choices=["auto", "off", "f2", "f4"], default="auto",
                   help="3x3 convolutions in Winograd form: where the measured table says faster (auto), never, "
                        "or everywhere with F(2x2,3x3) / F(4x4,3x3)")
    p.add_argument("--fp16-norms", choices=["fp32", "fp16"], default="fp32",
                   help="ExecuTorch fp16: compute GroupNorm/LayerNorm in fp32 (accurate, default) or fp16 (faster)")
    p.add_argument("--out", type=path_arg, required=True,
                   help="artifact folder (written atomically; an existing one is replaced only if it is an earlier "
                        f"export, holding {MANIFEST})")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace --out even if it is not an earlier export (no {MANIFEST})")

    def run(args: argparse.Namespace) -> None:
        from ..export.base import ExportOptions, export_bundle, get_exporter, load_builtins
        from ..fileio import prepare_output_dir
        from ..sources import load_model

        prepare_output_dir(args.out, MANIFEST, args.overwrite)
        options = ExportOptions(components=tuple(args.components), precision=args.precision,
                                batch_sizes=args.batch_sizes, resolutions=args.resolutions,
                                extra={"deployment_target": args.deployment_target, "winograd": args.winograd,
                                       "executorch_delegate": args.executorch_delegate,
                                       "fp16_norms": args.fp16_norms})
        load_builtins()
        for target in args.targets:
            get_exporter(target)
        if "coreml" in args.targets:
            from ..export.coreml import deployment_target

            deployment_target(options)
        bundle = load_model(args.model)
        model = args.model if not Path(args.model).exists() else str(Path(args.model).resolve())
        aset = export_bundle(bundle, model, args.targets, options, args.out,
                             log=None if args.json else (lambda m: print(m, file=sys.stderr)))
        lines = [f"{a.target:<11}{a.component:<14}{a.precision:<6}{a.path}  "
                 f"({a.details.get('bytes', 0) / 1e6:.1f} MB, fused attention {a.details.get('fused_attention', '-')}, "
                 f"{a.details.get('export_seconds', '-')} s)" for a in aset.artifacts]
        emit(args, {"out": str(args.out), "model": aset.model,
                    "artifacts": [a.__dict__ for a in aset.artifacts]}, "\n".join(lines + [f"artifacts: {args.out}"]))
    return run


@command("validate", "check exported artifacts against the PyTorch reference (per component and end to end)")
def _validate(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("artifacts", type=path_arg, help="a folder written by `pocketdiff export`")
    p.add_argument("--targets", type=_csv, default=None, help="only these targets (default: all in the folder)")
    p.add_argument("--model", default=None, help="reference model (default: the one recorded at export)")
    p.add_argument("--steps", type=sample_value("steps", int), default=None,
                   help="sampling steps (default: the model's own, else 8)")
    p.add_argument("--seed", type=sample_value("seed", int), default=0)
    p.add_argument("--report", type=path_arg, default=None, help="also write the JSON report here")

    def run(args: argparse.Namespace) -> None:
        from ..fileio import atomic_write_json, prepare_output_file
        from ..runtimes.harness import ValidateConfig, raise_on_failure, validate
        from ..sources import load_model

        if args.report:
            prepare_output_file(args.report, "--report")
        bundle = load_model(args.model) if args.model else None
        report = validate(args.artifacts, bundle=bundle, targets=args.targets,
                          config=ValidateConfig(steps=args.steps, seed=args.seed), progress=False)
        if args.report:
            atomic_write_json(args.report, report)
        lines = []
        for t in report["targets"]:
            psnr_text = f"{t['psnr_db']:.2f} dB" if t["psnr_db"] is not None else "n/a"
            lines.append(f"{t['target']} ({t['precision']}): {t['status']}; end-to-end PSNR {psnr_text} "
                         f"(gate {t['gate_db']} dB)")
            for comp, c in t["components"].items():
                if "parity" in c:
                    worst = max(c["parity"], key=lambda r: r["rel_l2"])
                    lines.append(f"  {comp:<13} max abs {worst['max_abs']:.3g}  rel L2 {worst['rel_l2']:.3g}  "
                                 f"cosine {worst['cosine']:.6f}  ({len(c['parity'])} shapes)")
                else:
                    lines.append(f"  {comp:<13} {c['status']}")
        emit(args, report, "\n".join(lines))
        raise_on_failure(report)
    return run

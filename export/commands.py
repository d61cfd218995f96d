"""`pocketdiff export` and `pocketdiff validate`: thin layers over export_bundle and the harness."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    p.add_argument("--onnx-attention", choices=["ort_mha", "softmax"], default="ort_mha",
                   help="ONNX: onnxruntime's contrib MultiHeadAttention (default) or standard ops only (other runtimes)")
    p.add_argument("--fp16-norms", choices=["fp32", "fp16"], default="fp32",
                   help="ExecuTorch fp16: compute GroupNorm/LayerNorm in fp32 (accurate, default) or fp16 (faster)")
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="quantize the exported graphs: w8a8 (U-Net static int8, text encoder and VAE int8 weights) or "
                        "w8 (int8 weights only); the artifacts must pass the scheme's gate or nothing is written")
    p.add_argument("--calibration", type=path_arg, default=None,
                   help="calibration set from `pocketdiff calibrate` (default: recorded now from the model's sampler)")
    p.add_argument("--out", type=path_arg, required=True,
                   help="artifact folder (written atomically; an existing one is replaced only if it is an earlier "
                        f"export, holding {MANIFEST})")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace --out even if it is not an earlier export (no {MANIFEST})")

    def run(args: argparse.Namespace) -> None:
        from ..compress.quantize.calibration import CalibrationSet
        from ..compress.quantize.spec import make_spec
        from ..errors import ConfigError
        from ..export.base import ExportOptions, export_bundle, get_exporter, load_builtins
        from ..export.quantize import check_quantization
        from ..fileio import prepare_output_dir
        from ..sources import load_model

        spec = make_spec(args.quantize, tuple(args.components)) if args.quantize else None
        if args.calibration and not spec:
            raise ConfigError("--calibration is only used with --quantize")
        calibration = CalibrationSet.load(args.calibration) if args.calibration else None
        prepare_output_dir(args.out, MANIFEST, args.overwrite)
        options = ExportOptions(components=tuple(args.components), precision=args.precision,
                                batch_sizes=args.batch_sizes, resolutions=args.resolutions,
                                extra={"deployment_target": args.deployment_target, "winograd": args.winograd,
                                       "onnx_attention": args.onnx_attention,
                                       "executorch_delegate": args.executorch_delegate,
                                       "fp16_norms": args.fp16_norms})
        load_builtins()
        for target in args.targets:
            get_exporter(target)
        if spec:
            options = check_quantization(args.targets, spec, options)
        if "coreml" in args.targets:
            from ..export.coreml import deployment_target

            deployment_target(options)
        bundle = load_model(args.model)
        model = args.model if not Path(args.model).exists() else str(Path(args.model).resolve())
        log = None if args.json else (lambda m: print(m, file=sys.stderr))
        step = _quantize_step(bundle, spec, calibration, args.calibration, log) if spec else None
        aset = export_bundle(bundle, model, args.targets, options, args.out, log=log, step=step)
        lines = [f"{a.target:<11}{a.component:<14}{a.precision:<6}{a.path}  "
                 f"({a.details.get('bytes', 0) / 1e6:.1f} MB, fused attention {a.details.get('fused_attention', '-')}, "
                 f"{a.details.get('export_seconds', '-')} s{_bits(a.details)})" for a in aset.artifacts]
        result = {"out": str(args.out), "model": aset.model, "artifacts": [a.__dict__ for a in aset.artifacts]}
        if step:
            result["quantization"] = {"spec": aset.quantization, "gate": step.gate.report}
            lines += [_gate_line(t) for t in step.gate.report["targets"]]
        emit(args, result, "\n".join(lines + [f"artifacts: {args.out}"]))
    return run


def _quantize_step(bundle: Any, spec: Any, calibration: Any, source: Path | None, log: Any) -> Any:
    """The quantized export's step: the calibration set (checked against the model, or recorded now along the
    model's own sampler) and the gate, both at the sampler settings validation uses."""
    from ..compress.quantize.calibration import record_calibration
    from ..export.quantize import Quantization, QuantizeExport
    from ..runtimes.harness import FALLBACK
    from ..runtimes.quantize_gate import QuantizationGate
    from ..sampler import SampleConfig

    if spec.needs_calibration and calibration is not None:
        calibration.check_model(bundle, str(source))
    elif spec.needs_calibration:
        if log:
            log("recording calibration data along the model's sampler")
        calibration = record_calibration(bundle, SampleConfig.for_bundle(bundle, fallback=FALLBACK))
    return QuantizeExport(bundle, Quantization(spec, calibration if spec.needs_calibration else None),
                          QuantizationGate(bundle))


def _bits(details: dict[str, Any]) -> str:
    """', 8.31 bits/weight (w8a8)' for a quantized artifact, else ''."""
    q = details.get("quantization")
    return f", {q['bits_per_weight']:.2f} bits/weight ({q['kind']})" if q else ""


def _gate_line(target: dict[str, Any]) -> str:
    """The quantization gate's figures for one target."""
    acc = target.get("prompt_accuracy", {})
    acc_text = (f"prompt accuracy {acc['quantized']:.2f} (float {acc['float']:.2f})" if "quantized" in acc
                else f"prompt accuracy {acc.get('status', 'n/a')}")
    return (f"gate {target['target']} {target['quantization']}: {target['status']}; end-to-end PSNR "
            f"{target['psnr_db']:.2f} dB (gate {target['gate_db']} dB); {acc_text}")


@command("calibrate", "record quantization calibration data along a model's own sampler (all steps, cond + uncond)")
def _calibrate(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="'fashion' (built-in), arch:sd15|sd21|sdxl|tiny or a diffusers folder")
    p.add_argument("--seed", type=sample_value("seed", int), default=0, help="image i starts from seed + i")
    p.add_argument("--out", type=path_arg, required=True, help="calibration file to write (.safetensors)")

    def run(args: argparse.Namespace) -> None:
        from ..compress.quantize.calibration import record_calibration
        from ..fileio import prepare_output_file
        from ..runtimes.harness import FALLBACK
        from ..sampler import SampleConfig
        from ..sources import load_model

        prepare_output_file(args.out, "--out")
        bundle = load_model(args.model)
        calibration = record_calibration(bundle, SampleConfig.for_bundle(bundle, fallback=FALLBACK), seed=args.seed)
        calibration.save(args.out)
        record = calibration.record()
        emit(args, {"out": str(args.out), **{k: v for k, v in record.items() if k != "prompts"},
                    "prompts": len(record["prompts"])},
             f"{record['calls']} U-Net calls over {len(record['prompts'])} prompts ({record['scheduler']} "
             f"{record['steps']} steps, guidance {record['guidance_scale']}, seed {record['seed']}): {args.out}")
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
            scheme = f", quantized {t['quantization']}" if t.get("quantization") else ""
            lines.append(f"{t['target']} ({t['precision']}{scheme}): {t['status']}; end-to-end PSNR {psnr_text} "
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

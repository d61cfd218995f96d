"""Samples/s of the latent consistency distillation step, plain eager against faster forms, in one run.

Each mode builds the same LCM run (`compress.distill.lcm.build_lcm`: same teacher, student, data,
batch and seed), takes warm-up steps (compilation happens there), then times `--steps` steps
between two device synchronisations. The step costs six U-Net calls' worth of arithmetic per
sample (student forward and backward ≈ 3, teacher conditional + unconditional = 2, EMA target 1):
the achieved TFLOP/s counts those with the U-Net's measured MACs per call.
Usage (GPU host): python bench/distill_throughput.py --model fashion --batch 1024 --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pocketdiff.compress.distill.lcm import LatentConsistencyPass, build_lcm
from pocketdiff.costs import measure_costs
from pocketdiff.devices import resolve_device
from pocketdiff.settings import parse
from pocketdiff.sources import load_model

UNET_CALLS_PER_SAMPLE = 6


# name -> the LCM settings that make it; "plain" is the straightforward eager step (fp32 teacher under autocast)
MODES = {
    "plain": {"compile": "off", "teacher_bf16": False},
    "bf16-teacher": {"compile": "off", "teacher_bf16": True},
    "compile": {"compile": "default", "teacher_bf16": True},
    "compile-max-autotune": {"compile": "max-autotune-no-cudagraphs", "teacher_bf16": True},
    "compile-cudagraphs": {"compile": "reduce-overhead", "teacher_bf16": True},
}


def time_mode(model: str, mode: str, batch: int, warmup: int, steps: int, work: Path, device: str,
              data_limit: int | None = None) -> dict:
    """Seconds per LCM step in one mode (fresh modules; the latents cache in `work` is shared)."""
    teacher = load_model(model)
    settings = parse(LatentConsistencyPass.Settings, {"batch_size": batch, "iterations": warmup + steps,
                                                      "data_limit": data_limit, **MODES[mode]})
    run = build_lcm(teacher, load_model(model), settings, work, torch.device(device), progress=False)
    t0 = time.monotonic()
    for _ in range(warmup):
        run.trainer.one_step(run.step)
    _sync(device)
    warm_s = time.monotonic() - t0
    t1 = time.monotonic()
    for _ in range(steps):
        ctx = run.trainer.one_step(run.step)
    _sync(device)
    per_step = (time.monotonic() - t1) / steps
    return {"mode": mode, "batch": batch, "s_per_step": per_step, "samples_per_s": batch / per_step,
            "warmup_s": round(warm_s, 1), "last_loss": float(ctx.metrics["loss"])}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fashion")
    ap.add_argument("--batch", type=int, nargs="+", default=[1024])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help="cuda (what the figures are for) or cpu (a smoke test)")
    ap.add_argument("--data-limit", type=int, default=None, help="first N training images (smoke tests)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    unet_macs = next(c.macs for c in measure_costs(load_model(args.model)) if c.component == "unet")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for batch in args.batch:
            for mode in args.modes:
                try:
                    row = time_mode(args.model, mode, batch, args.warmup, args.steps, Path(work), device, args.data_limit)
                except Exception as e:  # noqa: BLE001  (a mode that does not compile is reported, not fatal)
                    row = {"mode": mode, "batch": batch, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                if "s_per_step" in row:
                    row["tflops"] = 2 * unet_macs * UNET_CALLS_PER_SAMPLE * batch / row["s_per_step"] / 1e12
                rows.append(row)
                print(json.dumps(row), flush=True)
    where = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "CPU"
    print(f"\n{args.model} LCM step on {where}, torch {torch.__version__}, "
          f"U-Net {unet_macs / 1e9:.3f} GMACs/call, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'batch':>6} {'mode':<28} {'s/step':>8} {'samples/s':>10} {'vs plain':>9} {'TFLOP/s':>8} {'warm-up s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:>6} {r['mode']:<28} failed: {r['error']}")
            continue
        base = next((b for b in rows if b["batch"] == r["batch"] and b["mode"] == "plain" and "s_per_step" in b), None)
        ratio = base["s_per_step"] / r["s_per_step"] if base else float("nan")
        print(f"{r['batch']:>6} {r['mode']:<28} {r['s_per_step']:>8.4f} {r['samples_per_s']:>10.0f} {ratio:>8.2f}x "
              f"{r['tflops']:>8.1f} {r['warmup_s']:>9.1f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "distill_throughput.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Step-distilled students against their teacher on the Fashion-MNIST yardstick, in one run.

For the teacher (DPM-Solver++ 25 steps, its best cell, and the gate's DDIM 50, both g=4) and each
student: FID / KID / prompt accuracy on `--samples` images scored as 8-bit images (as saved), the
same images' float-scored FID for the teacher (how much the 8-bit rule moves the old headline),
PSNR / SSIM of each student's first `--agree` images against the teacher's best cell (same prompts
and seeds), and the negative-prompt effect on confusable class pairs: how much naming class B as
the negative prompt lowers the classifier's probability of B when prompting A, against an empty
negative prompt. A student with a guidance input is first swept over `--guidance` at its own step
count on `--sweep-samples` images; the best scale is then used at every step count. A student is
scored at `--steps`, or at the step counts after its name (`DIR@4` or `DIR@2,4,8`; `DIR@own` is the
count it was distilled for: a progressive or CFG-aware student samples only at its own).
Usage (GPU host): python bench/student_quality.py --student DIR[@STEPS] [...] --captions-cache FILE --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pocketdiff.bundle import Bundle
from pocketdiff.data import CLASSES, TEMPLATES, class_prompts
from pocketdiff.evaluate import Yardstick
from pocketdiff.fileio import atomic_write_json
from pocketdiff.guidance import takes_guidance
from pocketdiff.metrics.agreement import psnr, ssim
from pocketdiff.metrics.classifier import to_classifier_input
from pocketdiff.metrics.fid import fid_from_features, inception_features
from pocketdiff.sampler import CachedTextComponents, SampleConfig, TorchComponents, generate
from pocketdiff.sources import load_model
from pocketdiff.teacher.train import caption_table

CONFUSABLE = [("shirt", "t-shirt"), ("t-shirt", "shirt"), ("pullover", "coat"), ("coat", "pullover"),
              ("sneaker", "sandal"), ("sandal", "sneaker")]


def components_for(bundle: Bundle, table: dict | None, device: str, dtype: torch.dtype) -> TorchComponents:
    """The Bundle's own text encoder where it has one, else the carried text states."""
    bundle.to(device, dtype)
    return TorchComponents(bundle, device, dtype) if bundle.text_encoder is not None else \
        CachedTextComponents(bundle, table, device, dtype)


@torch.no_grad()
def negative_prompt_effect(bundle: Bundle, comps: TorchComponents, yard: Yardstick, cfg: SampleConfig,
                           n: int) -> dict:
    """Mean drop in P(class B) when B is the negative prompt of prompt A, over the confusable pairs."""
    rows = []
    for a, b in CONFUSABLE:
        prompt, negative = TEMPLATES[0].format(a), TEMPLATES[0].format(b)
        probs = []
        for neg in ("", negative):
            c = SampleConfig(**{**cfg.__dict__, "negative_prompt": neg})
            images = generate(bundle, [prompt] * n, c, comps, progress=False)
            logits = yard.classifier(to_classifier_input(images).to(next(yard.classifier.parameters()).device))
            probs.append(float(logits.softmax(1)[:, CLASSES.index(b)].mean()))
        rows.append({"prompt": a, "negative": b, "p_b_empty_negative": probs[0], "p_b_with_negative": probs[1],
                     "drop": probs[0] - probs[1]})
    return {"pairs": rows, "mean_drop": sum(r["drop"] for r in rows) / len(rows), "images_per_arm": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", nargs="*", default=[], help="student pipeline folders, each DIR or DIR@STEPS")
    ap.add_argument("--teacher", default="fashion")
    ap.add_argument("--captions-cache", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--guidance", type=float, nargs="+", default=[3.0, 4.0, 5.0, 6.0])
    ap.add_argument("--sweep-samples", type=int, default=2_000)
    ap.add_argument("--agree", type=int, default=1_000, help="images compared with the teacher's (PSNR/SSIM)")
    ap.add_argument("--negative-samples", type=int, default=200, help="images per arm of the negative-prompt test")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--no-teacher", action="store_true", help="skip the teacher cells")
    ap.add_argument("--reference-samples", type=int, default=None, help="real test images (default: all 10,000)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32  # the weights ship in fp16
    torch.backends.cuda.matmul.allow_tf32 = False  # Inception in true fp32
    table = caption_table(args.captions_cache) if args.captions_cache else None
    yard = Yardstick.load(device, reference_n=args.reference_samples, data_root=args.data)
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
                    "date": time.strftime("%Y-%m-%d"), "samples": args.samples, "cells": []}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        atomic_write_json(args.out / "student_quality.json", report)

    def cell(name: str, bundle: Bundle, comps: TorchComponents, cfg: SampleConfig, n: int, keep: bool = False) -> dict:
        t0 = time.monotonic()
        prompts, labels = class_prompts(max(1, n // 10))
        images = generate(bundle, prompts[:n], cfg, comps, progress=False)
        r = {**yard.score(images, labels[:n]), "scheduler": cfg.scheduler, "steps": cfg.steps,
             "guidance_scale": cfg.guidance_scale, "seed": cfg.seed}
        r.update(name=name, generate_s=round(time.monotonic() - t0, 1))
        if keep and name.startswith("teacher"):
            r["fid_float_scored"] = fid_from_features(inception_features(images, yard.inception), yard.reference)
        if reference is not None and not name.startswith("teacher"):
            m = min(args.agree, len(images), len(reference))
            r.update(psnr_to_teacher=psnr(images[:m], reference[:m]), ssim_to_teacher=ssim(images[:m], reference[:m]))
        print(json.dumps({k: v for k, v in r.items() if not isinstance(v, (list, dict))}), flush=True)
        report["cells"].append(r)
        save()
        return {"images": images if keep else None, **r}

    teacher = load_model(args.teacher)
    t_comps = components_for(teacher, table, device, dtype)
    best_cfg = SampleConfig(steps=25, scheduler="dpmsolver++", guidance_scale=4.0, batch_size=args.batch_size)
    reference = None
    if not args.no_teacher:
        reference = cell("teacher dpmsolver++ 25 g=4", teacher, t_comps, best_cfg, args.samples, keep=True)["images"]
        cell("teacher ddim 50 g=4", teacher, t_comps, SampleConfig(steps=50, scheduler="ddim", guidance_scale=4.0,
                                                                    batch_size=args.batch_size), args.samples, keep=True)
        report["teacher_negative_prompt"] = negative_prompt_effect(teacher, t_comps, yard, best_cfg,
                                                                   args.negative_samples)
        print("teacher negative prompt", report["teacher_negative_prompt"]["mean_drop"], flush=True)
    for spec in args.student:
        folder, _, steps_spec = spec.partition("@")
        folder = Path(folder)
        label = f"{folder.parent.name}/{folder.name}"  # run/stage
        student = Bundle.load(folder)
        comps = components_for(student, table, device, dtype)
        # a student that records no sampler of its own (a slimmed U-Net) samples as the teacher's best cell does
        own = SampleConfig.for_bundle(student, fallback=best_cfg.__dict__, batch_size=args.batch_size)
        step_counts = args.steps if not steps_spec else [own.steps] if steps_spec == "own" else \
            [int(n) for n in steps_spec.split(",")]
        g_best = own.guidance_scale
        if takes_guidance(student.unet):
            sweep = [cell(f"{label} sweep {own.steps} steps g={g}", student, comps,
                          SampleConfig(**{**own.__dict__, "guidance_scale": g}), args.sweep_samples)
                     for g in args.guidance]
            g_best = min(sweep, key=lambda r: r["fid"])["guidance_scale"]
        for steps in step_counts:
            cfg = SampleConfig(**{**own.__dict__, "steps": steps, "guidance_scale": g_best})
            cell(f"{label} {steps} steps g={g_best}", student, comps, cfg, args.samples, keep=True)
        report.setdefault("student_negative_prompt", {})[label] = negative_prompt_effect(
            student, comps, yard, SampleConfig(**{**own.__dict__, "guidance_scale": g_best}), args.negative_samples)
        save()
    print(f"\n{'cell':<56}{'FID':>8}{'KID':>9}{'acc':>7}{'prec':>7}{'recall':>7}{'PSNR':>7}{'SSIM':>7}")
    for r in report["cells"]:
        print(f"{r['name']:<56}{r['fid']:>8.2f}{r['kid']:>9.4f}{r['prompt_accuracy']:>7.3f}{r['precision']:>7.3f}"
              f"{r['recall']:>7.3f}{r.get('psnr_to_teacher', float('nan')):>7.2f}"
              f"{r.get('ssim_to_teacher', float('nan')):>7.3f}")


if __name__ == "__main__":
    main()

"""Slimmed U-Nets and the light VAE decoder against the teacher's: params, MACs per call, onnxruntime CPU latency.

Each BK-SDM preset (`remove-blocks`) and each `--prune` MACs target (the `prune` pass: Taylor importance on
its default calibration batches, no recovery) is applied to the teacher (its kept weights; latency does not
depend on training), the light decoder (`light-decoder`'s AutoencoderTiny, untrained) replaces its VAE,
and every variant is exported to ONNX fp32 at batch 1 and timed in the same run with the fair
rotating-block method (`runtimes.profiler.compare_latency`): U-Nets against the teacher's U-Net,
decoders against the teacher's decoder. MACs and params come from `pocketdiff.costs` (torch's FLOP
counter). `--arch sd15` adds the presets on an architecture's config, on the meta device (costs only).
Usage: python bench/slim_latency.py [--model fashion] [--presets base small tiny] [--prune 0.1 0.3] [--arch sd15]
       [--blocks 5 --per-block 20]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from pocketdiff.compress.slim.blocks import PRESETS, build_student, plan_removal, preset_removals
from pocketdiff.compress.slim.decoder import light_vae_config
from pocketdiff.costs import measure_costs
from pocketdiff.export.base import ExportOptions, export_bundle
from pocketdiff.export.components import example_inputs
from pocketdiff.runtimes.base import open_session
from pocketdiff.runtimes.profiler import compare_latency
from pocketdiff.sources import load_model
from pocketdiff.zoo import build_arch


def slimmed(bundle, preset: str):
    """A copy of `bundle` whose U-Net is the preset's student."""
    out = copy.copy(bundle)
    config = dict(bundle.unet.config)
    out.unet = build_student(bundle.unet, plan_removal(config, preset_removals(config, preset)))
    return out


def pruned(bundle, target: float, work: Path):
    """A copy of `bundle` whose U-Net is the `prune` pass's at MACs target `target`."""
    from pocketdiff.compress.slim.prune import PrunePass
    from pocketdiff.passes import PassContext

    settings = PrunePass.Settings(target=target)
    return PrunePass().apply(copy.copy(bundle), settings, PassContext(work_dir=work, progress=False)).bundle


def with_light_decoder(bundle, width: int):
    """A copy of `bundle` whose VAE is the (untrained) light AutoencoderTiny."""
    import diffusers

    out = copy.copy(bundle)
    torch.manual_seed(0)
    out.vae = diffusers.AutoencoderTiny(**light_vae_config(bundle.vae, width, None)).eval()
    return out


def cost(bundle, component: str, weights_only: bool = False):
    """(params, MACs per call) of one component; `weights_only`: conv/linear MACs, as published figures count."""
    c = next(c for c in measure_costs(bundle) if c.component == component)
    return c.params, c.weight_macs if weights_only else c.macs


def runner(bundle, component: str, folder: Path):
    """A zero-argument callable running one exported component on onnxruntime CPU."""
    aset = export_bundle(bundle, "bench", ["onnx"], ExportOptions(components=(component,), batch_sizes=(1,)), folder)
    session = open_session(aset.find("onnx", component), folder)
    feeds = {k: v.numpy() for k, v in example_inputs(bundle, component, 1).items()}
    return lambda: session.run(feeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fashion")
    ap.add_argument("--presets", nargs="*", default=list(PRESETS), choices=PRESETS, help="block-removal rows")
    ap.add_argument("--prune", nargs="*", type=float, default=[], help="prune rows: MACs targets")
    ap.add_argument("--arch", default=None, help="also list the presets' costs on arch NAME (meta device)")
    ap.add_argument("--width", type=int, default=16, help="light decoder width (fashion-slim's)")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--per-block", type=int, default=20)
    args = ap.parse_args()
    teacher = load_model(args.model)
    decoders = {"teacher": teacher, "light": with_light_decoder(teacher, args.width)}
    with tempfile.TemporaryDirectory() as tmp:
        unets = ({"teacher": teacher} | {p: slimmed(teacher, p) for p in args.presets}
                 | {f"prune-{t:g}": pruned(teacher, t, Path(tmp) / f"w-{t:g}") for t in args.prune})
        unet_runs = {n: runner(b, "unet", Path(tmp) / f"u-{n}") for n, b in unets.items()}
        dec_runs = {n: runner(b, "vae_decoder", Path(tmp) / f"d-{n}") for n, b in decoders.items()}
        unet_stats = compare_latency(unet_runs, blocks=args.blocks, per_block=args.per_block)
        dec_stats = compare_latency(dec_runs, blocks=args.blocks, per_block=args.per_block)
    print(f"U-Net of {args.model} at {teacher.resolution}px, batch 1, onnxruntime CPU fp32")
    print(f"{'variant':<10}{'params':>12}{'MACs':>14}{'MACs vs T':>11}{'median ms':>11}{'speed-up':>10}")
    t_params, t_macs = cost(teacher, "unet")
    for name, bundle in unets.items():
        params, macs = cost(bundle, "unet")
        st = unet_stats[name]
        widths = list(bundle.unet.config.block_out_channels)
        print(f"{name:<10}{params:>12,}{macs:>14,}{macs / t_macs:>11.3f}{1000 * st.median_s:>11.3f}"
              f"{unet_stats['teacher'].median_s / st.median_s:>9.2f}x  {widths}")
    print(f"\nVAE decoder of {args.model}, latents {list(example_inputs(teacher, 'vae_decoder', 1)['latent_sample'].shape)}")
    _, t_dec_macs = cost(teacher, "vae_decoder")
    for name, (params, macs) in ((n, cost(b, "vae_decoder")) for n, b in decoders.items()):
        st = dec_stats[name]
        print(f"{name:<10}{params:>12,}{macs:>14,}{t_dec_macs / macs:>10.1f}x fewer{1000 * st.median_s:>9.3f} ms"
              f"{dec_stats['teacher'].median_s / st.median_s:>9.2f}x")
    if args.arch:
        arch = build_arch(args.arch, device="meta")
        print(f"\narch:{args.arch} U-Net at {arch.resolution}px (meta device, costs only; MACs of conv/linear "
              "layers, attention products left out, as published figures count)")
        base_params, base_macs = cost(arch, "unet", weights_only=True)
        print(f"{'teacher':<10}{base_params / 1e6:>10.1f} M{base_macs / 1e9:>10.1f} G")
        for preset in PRESETS:
            config = dict(arch.unet.config)
            plan = plan_removal(config, preset_removals(config, preset))
            variant = copy.copy(arch)
            with torch.device("meta"):
                import diffusers

                variant.unet = diffusers.UNet2DConditionModel.from_config(plan.config).eval()
            params, macs = cost(variant, "unet", weights_only=True)
            print(f"{preset:<10}{params / 1e6:>10.1f} M{macs / 1e9:>10.1f} G  ({100 * (1 - macs / base_macs):.1f} % "
                  f"fewer MACs, {100 * (1 - params / base_params):.1f} % fewer params)")


if __name__ == "__main__":
    main()

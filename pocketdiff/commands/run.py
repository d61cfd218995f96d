"""`pocketdiff run` and `pocketdiff train`: recipes stage by stage, and the built-in trainers."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import Handler, command, emit, path_arg


@command("run", "run a recipe stage by stage into a run folder; unchanged stages are reused")
def _run(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("recipe", nargs="?", default="default", help="a recipe TOML file or a built-in recipe name")
    p.add_argument("--model", default=None, help="override the recipe's model")
    p.add_argument("--model-config", type=path_arg, default=None,
                   help="diffusers config folder for a single-file checkpoint (default: SD1.5/SD2.1 from the zoo)")
    p.add_argument("--out", type=path_arg, default=None, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which a training stage stops resumably (exit 75: run again to resume)")
    p.add_argument("--overwrite", action="store_true", help="reuse an --out folder that is not a pocketdiff run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PASS.KEY=VALUE",
                   help="override a pass setting (PASS: its name or 1-based number; VALUE in TOML), repeatable")

    def run(args: argparse.Namespace) -> None:
        import sys

        from .. import distributed
        from ..devices import resolve_device
        from ..errors import Unfinished
        from ..fileio import prepare_output_dir
        from ..recipe import load_recipe
        from ..runner import RUN_FILE, RunOptions, run_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        out = prepare_output_dir(args.out or Path("runs") / Path(recipe.source).stem, RUN_FILE,
                                 overwrite=args.overwrite)
        options = RunOptions(device=distributed.setup(resolve_device(args.device)), time_limit_s=args.time_limit,
                             progress=not args.json and distributed.is_main(),
                             log=(lambda _: None) if args.json or not distributed.is_main()
                             else (lambda m: print(m, file=sys.stderr)))
        summary = run_recipe(recipe, out, model=args.model, config=args.model_config, options=options)
        if not distributed.is_main():
            return
        lines = [f"{s['folder']}: {s['status']} ({s['seconds']} s)" for s in summary["stages"]]
        lines += summary["samples"] + [f"run folder: {out}"]
        emit(args, summary, "\n".join(lines))
        if not summary["finished"]:
            raise Unfinished(f"stage {summary['stages'][-1]['folder']} reached the time limit; run the same "
                             "command again to resume it")
    return run


@command("train", "train the built-in teacher or the prompt-accuracy classifier")
def _train(p: argparse.ArgumentParser) -> Handler:
    from ..settings import add_flags, from_flags
    from ..teacher.config import TrainConfig

    p.add_argument("what", choices=["teacher", "classifier"])
    p.add_argument("--out", type=path_arg, required=True, help="output folder (teacher) or file (classifier)")
    p.add_argument("--data", type=path_arg, default=None, help="folder of the Fashion-MNIST idx files")
    p.add_argument("--captions-cache", type=path_arg, default=None,
                   help="caption embeddings file (made here if missing; lets a GPU host train without MiniLM)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--data-limit", type=int, default=None, help="train on the first N images only (tests)")
    add_flags(p, TrainConfig)
    p.add_argument("--vae-from", type=path_arg, default=None,
                   help="pipeline folder whose VAE to reuse instead of training one")
    p.add_argument("--unet-from", type=path_arg, default=None,
                   help="pipeline folder whose U-Net to continue training from (fresh optimizer and schedule)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder that is not a pocketdiff model")

    def run(args: argparse.Namespace) -> None:
        from ..bundle import MANIFEST
        from ..fileio import prepare_output_dir, prepare_output_file

        cfg = from_flags(TrainConfig, args, where="train")
        if args.what == "teacher":
            args.out = prepare_output_dir(args.out, MANIFEST, overwrite=args.overwrite)
        else:
            args.out = prepare_output_file(args.out, "--out")
        if args.what == "teacher":
            from ..teacher.train import train_teacher

            result = train_teacher(args.out, cfg, data_root=args.data, captions_cache=args.captions_cache,
                                   device=args.device, data_limit=args.data_limit, progress=not args.json,
                                   vae_from=args.vae_from, unet_from=args.unet_from)
        else:
            from ..metrics.classifier import train_classifier

            result = train_classifier(args.out, data_root=args.data, seed=cfg.seed, device=args.device,
                                      progress=not args.json)
        text = "\n".join(f"{k}: {v}" for k, v in result.items())
        emit(args, result, text)
    return run

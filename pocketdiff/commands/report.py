"""`pocketdiff report`: a thin layer over `pocketdiff.report.write_report`."""

from __future__ import annotations

import argparse

from . import Handler, command, emit, path_arg


@command("report", "one self-contained HTML page and its JSON for a run folder: stages, images, figures, plots")
def _report(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("run_dir", type=path_arg, help="a folder written by `pocketdiff run`")
    p.add_argument("--out", type=path_arg, default=None,
                   help="HTML file to write (default: RUN_DIR/report.html); the JSON goes beside it as .json")
    p.add_argument("--figures", type=path_arg, action="append", default=[], metavar="PATH",
                   help="also take figures from this file or folder (exports, profile, validate, eval JSON); "
                        "repeatable")
    p.add_argument("--no-images", action="store_true", help="do not sample the teacher and the stages")

    def run(args: argparse.Namespace) -> None:
        from ..report import ReportConfig, write_report

        result = write_report(args.run_dir, args.out,
                              ReportConfig(images=not args.no_images, figures=tuple(args.figures)))
        emit(args, {"html": result["html"], "json": result["json"]}, f"report: {result['html']}\n"
             f"data: {result['json']}")
    return run

"""The `pocketdiff` command: a thin layer over the Python API.

Exit codes: 0 success, 1 failure (including a quality gate missed), 2 usage or bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import PocketdiffError, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"pocketdiff: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    from .commands import COMMANDS, model, run  # noqa: F401  (model, run: register their subcommands)
    from .export import commands as _export  # noqa: F401  (export, validate)

    parser = _Parser(prog="pocketdiff", description="Make Stable-Diffusion-family models small, fast and "
                     "validated on phones.")
    parser.add_argument("--version", action="version", version=f"pocketdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (setup, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        p.add_argument("-v", "--verbose", action="store_true", help="show library warnings and tracebacks")
        p.set_defaults(handler=setup(p))
    return parser


def _quiet_libraries() -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in ("torchao", "torch._dynamo", "torch.utils._pytree", "coremltools", "nncf", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-v" not in argv and "--verbose" not in argv:
        _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
        return 0
    except PocketdiffError as e:
        if args.verbose:
            raise
        kind = "error" if isinstance(e, UserError) else "failed"
        print(f"pocketdiff: {kind}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("pocketdiff: interrupted; finished stages are kept, rerun to resume", file=sys.stderr)
        return 130


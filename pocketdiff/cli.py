"""The `pocketdiff` command: a thin layer over the Python API.

Exit codes: 0 success, 1 failure (including a quality gate missed), 2 usage or bad input, 75 a run
stopped at its time limit, 130 interrupted (SIGINT), 143 terminated (SIGTERM). Every failure is one
line on stderr, `pocketdiff: error: ...` (input), `pocketdiff: unfinished: ...` (time limit) or
`pocketdiff: failed: ...`; with --json it is also `{"error": {"kind", "message", "exit_code"}}` on stdout.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from . import __version__
from .errors import PocketdiffError, Unfinished, UserError

# What an interrupt leaves behind, for commands that keep finished work; every other command writes
# atomically, so an interrupt leaves nothing.
_KEPT_ON_INTERRUPT = {"run": "finished stages are kept; rerun the same command to resume",
                      "train": "checkpoints written so far are kept; rerun the same command to resume"}


class UsageError(UserError):
    """A command line argparse cannot read: unknown flag, missing argument, a value out of range."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command's work, raised where the program is so every cleanup (`atomic_dir`) runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block; main() prints it
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    from .commands import COMMANDS, model, report, run  # noqa: F401  (model, report, run: register their subcommands)
    from .export import commands as _export  # noqa: F401  (export, validate)
    from .runtimes import commands as _runtimes  # noqa: F401  (profile)

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


class _SignalState:
    """What the handler knows: whether the command has started work, and the signal received, if any."""

    working = False
    received: int | None = None


def _on_signal(signum: int, frame: object) -> None:
    """Before any work (imports, parsing): exit at once, nothing can be half-written. During work: raise
    `Interrupted` so cleanups run; later signals are ignored so they cannot cut the cleanup short."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    _SignalState.received = signum
    if not _SignalState.working:  # an exception raised inside a half-done import can be swallowed there
        sys.stderr.write(f"pocketdiff: stopped: {'interrupted' if signum == signal.SIGINT else 'terminated'}\n")
        sys.stderr.flush()
        os._exit(128 + signum)
    raise Interrupted(signum)


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM stop the command cleanly (`_on_signal`; SIGTERM would otherwise
    kill the process with its temporary folders in place); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _fail(kind: str, message: str, exit_code: int, as_json: bool, label: str = "error") -> int:
    """Report a failure: one line on stderr, and the JSON error object on stdout with --json."""
    if as_json:
        from .fileio import json_text

        print(json_text({"error": {"kind": kind, "message": message, "exit_code": exit_code}}))
    print(f"pocketdiff: {label}: {message}", file=sys.stderr)
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    _SignalState.working, _SignalState.received = False, None
    with interrupts_raise():
        argv = list(sys.argv[1:] if argv is None else argv)
        as_json, verbose, command = "--json" in argv, "-v" in argv or "--verbose" in argv, None
        try:
            if not verbose:
                _quiet_libraries()
            args = build_parser().parse_args(argv)
            command = args.command
            _SignalState.working = True
            args.handler(args)
            return 0
        except PocketdiffError as e:
            if verbose and not isinstance(e, UsageError):
                raise
            label = "error" if isinstance(e, UserError) else "unfinished" if isinstance(e, Unfinished) else "failed"
            return _fail(type(e).__name__, str(e), e.exit_code, as_json, label)
        except (OSError, MemoryError) as e:  # the machine's failure (disk full, out of memory), not a bug
            if verbose:
                raise
            return _fail(type(e).__name__, str(e) or type(e).__name__, 1, as_json, "failed")
        except BaseException:
            if _SignalState.received is None:
                raise
            # An interrupt, or what a library made of one (an import it cut short fails later, differently).
            code = 128 + _SignalState.received
            what = "interrupted" if _SignalState.received == signal.SIGINT else "terminated"
            kept = _KEPT_ON_INTERRUPT.get(command or "", "nothing half-written was left")
            print(file=sys.stderr)  # the interrupt may have cut a progress bar or a log line short
            return _fail("Interrupted", f"{command} {what}; {kept}", code, as_json, label="stopped")
        finally:
            _SignalState.working = False

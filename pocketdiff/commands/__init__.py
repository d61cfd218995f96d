"""The registry of `pocketdiff` subcommands and the helpers every subcommand shares.

Each command module registers its subcommands with `@command`; `pocketdiff.cli` imports the
modules and builds the parser. Nothing here imports the CLI, so the dependency runs one way.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], Any]
Setup = Callable[[argparse.ArgumentParser], Handler]
COMMANDS: dict[str, tuple[Setup, str]] = {}


def command(name: str, help: str) -> Callable[[Setup], Setup]:
    """Register a subcommand: the decorated function adds its arguments and returns its handler."""
    def wrap(setup: Setup) -> Setup:
        COMMANDS[name] = (setup, help)
        return setup
    return wrap


def emit(args: argparse.Namespace, result: Any, text: str) -> None:
    """Print `result` as strict JSON (NaN as null) with --json, else the human text."""
    from ..fileio import json_text

    print(json_text(result) if args.json else text)


def path_arg(value: str) -> Path:
    """argparse type for paths: a non-empty string."""
    if not value or "\0" in value:
        raise argparse.ArgumentTypeError(f"expected a path, got {value!r}")
    return Path(value)


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (no upper bound when hi is None)."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi:,}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value
    return convert


def sample_value(name: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type for SampleConfig field `name`: `convert` the text, then the sampler's own range check,
    so a flag and the Python API refuse the same values (as a usage error naming the flag)."""
    def check(text: str) -> Any:
        from ..errors import ConfigError
        from ..sampler import check_sample_value

        try:
            return check_sample_value(name, convert(text), label="value")
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {convert.__name__}, got {text!r}") from None
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return check

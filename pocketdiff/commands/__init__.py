"""The registry of `pocketdiff` subcommands and the helpers every subcommand shares.

Each command module registers its subcommands with `@command`; `pocketdiff.cli` imports the
modules and builds the parser. Nothing here imports the CLI, so the dependency runs one way.
"""

from __future__ import annotations

import argparse
import json
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
    """Print `result` as JSON with --json, else the human text."""
    print(json.dumps(result, indent=2, default=str) if args.json else text)


def path_arg(value: str) -> Path:
    """argparse type for paths."""
    return Path(value)

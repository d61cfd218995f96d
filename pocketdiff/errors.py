"""pocketdiff's own exception types: what the user did wrong, and what to do about it.

The CLI maps `UserError` subclasses to exit code 2 and `GateError` to exit code 1, printing the
message on one line with no traceback.
"""

from __future__ import annotations


class PocketdiffError(Exception):
    """Base of every error pocketdiff raises on purpose."""

    exit_code = 1


class UserError(PocketdiffError):
    """Bad input the user can fix: a path, a file, a config, a setting."""

    exit_code = 2


class InputPathError(UserError):
    """A path that is missing or is not what the command expects."""


class CorruptFileError(UserError):
    """A file that exists but cannot be read (truncated, wrong format)."""


class ConfigError(UserError):
    """A configuration that does not match the weights or the model, or an unknown setting."""


class RecipeError(UserError):
    """A recipe that names an unknown pass or setting, or cannot be parsed."""


class ShapeError(UserError):
    """A resolution, batch or tensor shape the model or artifact cannot take."""


class UnsupportedOpError(UserError):
    """An operation a backend cannot express; the message names the op and its module."""


class DataError(UserError):
    """Training or evaluation data that cannot be found or read."""


class GateError(PocketdiffError):
    """A measured quality or parity figure that missed its gate."""

    exit_code = 1


class RuntimeFailure(PocketdiffError):
    """A runtime that loaded an artifact but failed while running it (a broken lowering, not bad input)."""


class Unfinished(PocketdiffError):
    """A run that stopped at its time limit with a stage unfinished; rerunning resumes it."""

    exit_code = 75  # EX_TEMPFAIL: try again

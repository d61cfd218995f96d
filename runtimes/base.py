"""The one small interface every runtime adapter implements, and the registry of adapters.

A Session runs one exported artifact in its real runtime (onnxruntime, ExecuTorch's Python
runtime, Core ML). Adapters register under the export target they load; the validation harness
and the profiler only ever talk to `open_session`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from ..errors import UserError
from ..export.base import Artifact, load_builtins
from ..registry import Registry


class Session(Protocol):
    """A loaded artifact. `static_only` sessions (Core ML on Linux) can check but not run."""

    static_only: bool

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for inputs by name."""
        ...


class Runtime(Protocol):
    """Loads the artifacts of one export target."""

    target: ClassVar[str]

    def open(self, artifact: Artifact, folder: Path) -> Session:
        """A Session for `artifact`, whose files lie under the artifact folder `folder`."""
        ...


RUNTIMES: Registry[Runtime] = Registry("target", UserError, lambda name: f"no runtime adapter for {name!r} artifacts",
                                       load=load_builtins)
register_runtime = RUNTIMES.register


def open_session(artifact: Artifact, folder: Path) -> Session:
    """Load `artifact` (from the artifact folder `folder`) in the runtime registered for its target."""
    return RUNTIMES.create(artifact.target).open(artifact, Path(folder))

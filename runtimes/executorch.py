"""ExecuTorch adapter: runs `.pte` artifacts in ExecuTorch's Python runtime (XNNPACK on the CPU).

A program delegated to a backend this runtime lacks (Core ML off Apple platforms) gets a static
check only: the program loads and holds every method the manifest names; it is never reported passed.

An ExecuTorch artifact holds one method per exported (batch, resolution); the session picks the
method whose input shapes match the feeds. A batch that was not exported but is a multiple of the
largest exported batch at the same resolution (the harness's guided batch of 2 x prompts) runs in
chunks, which is exact because no component mixes samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorruptFileError, InputPathError, RuntimeFailure, ShapeError
from ..export.base import Artifact
from .base import register_runtime

_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def load_program(path: Path) -> Any:
    """An ExecuTorch Program; InputPathError if the file is missing, CorruptFileError if it is not a valid .pte."""
    from executorch.runtime import Runtime

    if not path.is_file():
        raise InputPathError(f"{path}: the artifact file is missing; re-export with `pocketdiff export`")
    try:
        return Runtime.get().load_program(path)
    except Exception as e:  # the runtime raises a bare RuntimeError with an error code for bad files
        raise CorruptFileError(f"{path}: ExecuTorch cannot load it ({str(e).strip()[:200]}); re-export it") from e


def backend_available(name: str) -> bool:
    """Whether ExecuTorch's runtime here has the delegate backend `name` (e.g. "CoreMLBackend")."""
    from executorch.runtime import Runtime

    return Runtime.get().backend_registry.is_available(name)


class ExecutorchSession:
    """One `.pte` artifact loaded in ExecuTorch's runtime."""

    def __init__(self, artifact: Artifact, folder: Path):
        self.artifact, self.path = artifact, Path(folder) / artifact.path
        self.program = load_program(self.path)
        self.backend = artifact.details.get("delegate", "XnnpackBackend")
        self.static_only = not backend_available(self.backend)
        self.methods: dict[str, dict[str, list[int]]] = artifact.details.get("methods", {})
        self.input_order: list[str] = artifact.details.get("input_order", list(artifact.inputs))
        self.output_order: list[str] = artifact.details.get("output_order", list(artifact.outputs))
        have = set(self.program.method_names)
        lost = [m for m in self.methods if m not in have]
        if lost or not self.methods:
            raise CorruptFileError(f"{self.path}: methods {lost or 'all'} named in the manifest are not in the program "
                                   f"(it has {sorted(have)}); re-export it")
        self._loaded: dict[str, Any] = {}
        self.checks = {"program_loads": True, "methods": sorted(self.methods), "delegate": self.backend,
                       "backend_here": not self.static_only}

    def method(self, name: str) -> Any:
        """The loaded method `name` (loaded once, on first use)."""
        if name not in self._loaded:
            try:
                self._loaded[name] = self.program.load_method(name)
            except Exception as e:
                raise CorruptFileError(f"{self.path}: method {name} does not load ({str(e).strip()[:200]})") from e
        return self._loaded[name]

    def plan(self, feeds: dict[str, np.ndarray]) -> tuple[str, int]:
        """(method, chunk batch) for these feeds; ShapeError naming the exported shapes if none fits."""
        missing = [n for n in self.input_order if n not in feeds]
        if missing:
            raise ShapeError(f"{self.artifact.component}: input {missing[0]!r} is missing "
                             f"(the artifact takes {', '.join(self.input_order)})")
        shapes = {n: list(np.shape(feeds[n])) for n in self.input_order}
        batch = shapes[self.input_order[0]][0]
        for name, want in self.methods.items():
            if shapes == want:
                return name, batch
        for name, want in sorted(self.methods.items(), key=lambda kv: -next(iter(kv[1].values()))[0]):
            b = next(iter(want.values()))[0]
            if batch % b == 0 and all(shapes[n][1:] == want[n][1:] and shapes[n][0] == batch for n in want):
                return name, b
        exported = "; ".join(f"{m}: {w}" for m, w in self.methods.items())
        raise ShapeError(f"{self.artifact.component}: inputs {shapes} are outside what this ExecuTorch artifact was "
                         f"exported for ({exported}); re-export with those --batch-sizes / --resolutions")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.static_only:
            raise ShapeError(f"{self.path}: delegated to {self.backend}, which this host's ExecuTorch runtime lacks; "
                             "here it is a static check only")
        name, chunk = self.plan(feeds)
        method = self.method(name)
        dtypes = {n: _TORCH[self.artifact.inputs[n]["dtype"]] for n in self.input_order}
        tensors = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(dtypes[n]) for n in self.input_order]
        batch = tensors[0].shape[0]
        outs: list[list[torch.Tensor]] = []
        for start in range(0, batch, chunk):
            try:
                result = method.execute([t[start:start + chunk].contiguous() for t in tensors])
            except Exception as e:  # the runtime raises a bare RuntimeError with an error code
                raise RuntimeFailure(f"{self.path}: ExecuTorch failed running method {name} on inputs "
                                     f"{[list(t.shape) for t in tensors]} ({str(e).strip()[:200]}); the program "
                                     "was lowered wrongly: re-export it, and report it if it fails again") from e
            outs.append([r.clone() for r in result])
        return {n: torch.cat([o[i] for o in outs]).numpy() for i, n in enumerate(self.output_order)}


@register_runtime
class ExecutorchRuntime:
    """Adapter for target "executorch"."""

    target = "executorch"

    def open(self, artifact: Artifact, folder: Path) -> ExecutorchSession:
        return ExecutorchSession(artifact, folder)

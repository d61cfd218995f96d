"""What every exporter shares: the artifact record, the artifact-folder manifest and the registry.

An exporter turns one Bundle component into one artifact for one runtime. Exporters register
under their target name ("onnx", "coreml", "executorch"); `pocketdiff export` looks them up here,
so adding a backend is one new module and no if/else anywhere else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ..bundle import Bundle
from ..errors import CorruptFileError, InputPathError, UserError
from ..fileio import atomic_write_json
from ..registry import Registry

MANIFEST = "artifacts.json"
COMPONENT_NAMES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
PRECISIONS = ("fp32", "fp16")


@dataclass
class ExportOptions:
    """What to export and for which shapes; the same for every target."""

    components: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder")
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = (1, 2)
    resolutions: tuple[int, ...] = ()  # image sides in pixels; empty = the model's native one
    extra: dict[str, Any] = field(default_factory=dict)  # target-specific (e.g. deployment_target)

    def __post_init__(self) -> None:
        bad = [c for c in self.components if c not in COMPONENT_NAMES]
        if bad:
            raise UserError(f"unknown component {bad[0]!r}; choose from {', '.join(COMPONENT_NAMES)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")


@dataclass
class Artifact:
    """One exported component: where it is and what it takes and returns.

    `inputs` / `outputs` map tensor names to {"shape": [...] (ints, or strings for dynamic dims),
    "dtype": "float32" | "float16" | "int64" | ...}. `shapes` lists the concrete input shapes the
    artifact was exported (and validated) for.
    """

    target: str
    component: str
    path: str  # relative to the artifact folder
    precision: str
    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    shapes: list[dict[str, list[int]]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # e.g. fused-attention op counts, export seconds


@dataclass
class ArtifactSet:
    """Every artifact of one export, plus what the sampler needs beside the graphs."""

    model: str
    artifacts: list[Artifact]
    sampler: dict[str, Any] = field(default_factory=dict)  # scheduler config, scaling_factor, tokenizer dir
    model_hash: str | None = None  # content hash of the exported weights, when the source has one

    def find(self, target: str, component: str) -> Artifact:
        """The artifact of `component` for `target`; InputPathError naming what the folder has."""
        for a in self.artifacts:
            if a.target == target and a.component == component:
                return a
        have = sorted({f"{a.target}/{a.component}" for a in self.artifacts})
        raise InputPathError(f"no {target} {component} artifact in this folder (has: {', '.join(have) or 'none'})")

    def save(self, folder: Path) -> None:
        """Write artifacts.json into `folder`, atomically."""
        atomic_write_json(Path(folder) / MANIFEST, {"model": self.model, "model_hash": self.model_hash,
                                                    "sampler": self.sampler,
                                                    "artifacts": [asdict(a) for a in self.artifacts]})

    @classmethod
    def load(cls, folder: Path) -> ArtifactSet:
        """Read a folder's artifacts.json; InputPathError if absent, CorruptFileError if unreadable."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise InputPathError(f"{folder}: not a pocketdiff artifact folder (no {MANIFEST}); "
                                 "make one with `pocketdiff export`")
        try:
            data = json.loads(path.read_text())
            return cls(model=data["model"], sampler=data.get("sampler", {}), model_hash=data.get("model_hash"),
                       artifacts=[Artifact(**a) for a in data["artifacts"]])
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptFileError(f"{path}: unreadable artifact manifest ({e})") from e


class Exporter(Protocol):
    """Turns one Bundle component into one artifact under `out` (a folder being written atomically)."""

    target: ClassVar[str]

    def export(self, bundle: Bundle, component: str, options: ExportOptions, out: Path) -> Artifact:
        ...


EXPORTERS: Registry[Exporter] = Registry("target", UserError, lambda name: f"unknown export target {name!r}")
register_exporter = EXPORTERS.register
get_exporter = EXPORTERS.create


# Backends that register themselves on import: each name is a module in export/ (its exporter) and,
# when present, in runtimes/ (its adapter). The Core ML / ExecuTorch owner adds "coreml" and
# "executorch" to this tuple.
BUILTIN_BACKENDS: tuple[str, ...] = ("onnx", "coreml", "executorch")


def load_builtins() -> None:
    """Import every built-in exporter and runtime adapter so they register."""
    import importlib
    import importlib.util

    for name in BUILTIN_BACKENDS:
        for package in ("pocketdiff.export", "pocketdiff.runtimes"):
            if importlib.util.find_spec(f"{package}.{name}") is not None:
                importlib.import_module(f"{package}.{name}")


def sampler_info(bundle: Bundle) -> dict[str, Any]:
    """What a runner needs beside the graphs: scheduler config, latent scaling and shape rules."""
    return {"scheduler": json.loads(json.dumps(dict(bundle.scheduler.config), default=str)),
            "scaling_factor": float(bundle.vae.config.scaling_factor),
            "vae_scale_factor": bundle.vae_scale_factor, "resolution": bundle.resolution,
            "latent_channels": int(bundle.unet.config.in_channels)}


def export_bundle(bundle: Bundle, model: str, targets: list[str], options: ExportOptions, out: Path,
                  log: Any = None) -> ArtifactSet:
    """Export every component for every target into `out`, atomically (a failure leaves `out` untouched)."""
    from ..fileio import atomic_dir

    load_builtins()
    exporters = [get_exporter(t) for t in targets]  # unknown targets fail before anything is written
    artifacts: list[Artifact] = []
    with atomic_dir(Path(out)) as tmp:
        for exporter in exporters:
            for component in options.components:
                if log:
                    log(f"{exporter.target}: exporting {component} ({options.precision})")
                artifacts.append(exporter.export(bundle, component, options, tmp))
        aset = ArtifactSet(model=model, artifacts=artifacts, sampler=sampler_info(bundle),
                           model_hash=bundle.manifest.content_hash)
        aset.save(tmp)
    return aset

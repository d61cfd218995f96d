"""What every exporter shares: the artifact record, the artifact-folder manifest and the registry.

An exporter turns one Bundle component into one artifact for one runtime. Exporters register
under their target name ("onnx", "coreml", "executorch"); `pocketdiff export` looks them up here,
so adding a backend is one new module and no if/else anywhere else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar, Protocol

from ..bundle import Bundle, read_json
from ..compress.quantize.spec import QuantSpec
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
    quantization: dict[str, Any] | None = None  # the `compress.quantize.spec.QuantSpec` the artifacts were made with

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
                                                    "sampler": self.sampler, "quantization": self.quantization,
                                                    "artifacts": [asdict(a) for a in self.artifacts]})

    @classmethod
    def load(cls, folder: Path) -> ArtifactSet:
        """Read a folder's artifacts.json; InputPathError if absent, CorruptFileError naming the key for a
        malformed entry or a path that leaves the folder (absolute, `..`, or a link pointing outside)."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise InputPathError(f"{folder}: not a pocketdiff artifact folder (no {MANIFEST}); "
                                 "make one with `pocketdiff export`")
        data = read_json(path)
        if not isinstance(data, dict):
            raise CorruptFileError(f"{path}: must be a JSON object, got {type(data).__name__}; re-export the folder")
        _require(path, data, "model", str)
        _require(path, data, "artifacts", list)
        _require(path, data, "sampler", dict, optional=True)
        _require(path, data, "model_hash", str, optional=True)
        artifacts = [_artifact(path, f"artifacts[{i}]", a) for i, a in enumerate(data["artifacts"])]
        quantization = data.get("quantization")
        if quantization is not None:
            QuantSpec.from_json(quantization, str(path))
        return cls(model=data["model"], sampler=data.get("sampler") or {}, model_hash=data.get("model_hash"),
                   artifacts=artifacts, quantization=quantization)


_ARTIFACT_FIELDS = {"target": str, "component": str, "path": str, "precision": str, "inputs": dict,
                    "outputs": dict, "shapes": list, "details": dict}
_OPTIONAL_FIELDS = ("shapes", "details")


def _require(path: Path, data: dict[str, Any], key: str, kind: type, optional: bool = False, where: str = "") -> None:
    """CorruptFileError naming `where.key` when it is missing (and not optional) or of the wrong type."""
    name = f"{where}.{key}" if where else key
    if key not in data or (optional and data[key] is None):
        if optional:
            return
        raise CorruptFileError(f"{path}: {name} is missing; re-export the folder")
    if not isinstance(data[key], kind):
        raise CorruptFileError(f"{path}: {name} must be a JSON {_JSON_NAMES[kind]}, got "
                               f"{json.dumps(data[key])[:60]}; re-export the folder")


_JSON_NAMES = {str: "string", list: "list", dict: "object"}


def _artifact(path: Path, where: str, raw: Any) -> Artifact:
    """One checked artifacts.json entry."""
    if not isinstance(raw, dict):
        raise CorruptFileError(f"{path}: {where} must be a JSON object; re-export the folder")
    unknown = sorted(set(raw) - set(_ARTIFACT_FIELDS))
    if unknown:
        raise CorruptFileError(f"{path}: {where} has an unknown key {unknown[0]!r}; re-export the folder")
    for key, kind in _ARTIFACT_FIELDS.items():
        _require(path, raw, key, kind, optional=key in _OPTIONAL_FIELDS, where=where)
    for key, allowed in (("component", COMPONENT_NAMES), ("precision", PRECISIONS)):
        if raw[key] not in allowed:
            raise CorruptFileError(f"{path}: {where}.{key} {raw[key]!r} is not one of {', '.join(allowed)}")
    for key in ("inputs", "outputs"):
        for name, desc in raw[key].items():
            ok = (isinstance(desc, dict) and isinstance(desc.get("dtype"), str) and isinstance(desc.get("shape"), list)
                  and all(isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                          for d in desc["shape"]))
            if not ok:
                raise CorruptFileError(f"{path}: {where}.{key}.{name} must be {{\"shape\": [sizes], \"dtype\": name}}; "
                                       "re-export the folder")
    for j, shape in enumerate(raw.get("shapes") or []):
        if not (isinstance(shape, dict) and all(
                isinstance(v, list) and v and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v)
                for v in shape.values())):
            raise CorruptFileError(f"{path}: {where}.shapes[{j}] must map inputs to lists of positive sizes")
    confined_path(path.parent, raw["path"], f"{path}: {where}.path")
    return Artifact(**{k: v for k, v in raw.items() if v is not None})


def confined_path(folder: Path, relative: str, where: str) -> Path:
    """`folder / relative`, refused (CorruptFileError) unless it stays inside `folder` once links are resolved."""
    rel = PurePosixPath(relative)
    if not relative or "\\" in relative or rel.is_absolute() or PureWindowsPath(relative).drive or ".." in rel.parts \
            or "\0" in relative:
        raise CorruptFileError(f"{where} {relative!r} must be a relative path inside the artifact folder; "
                               "re-export the folder")
    full = Path(folder) / rel
    try:
        inside = full.resolve().is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError) as e:  # a link loop, a name too long for the filesystem
        raise CorruptFileError(f"{where} {relative!r} cannot be resolved ({e})") from e
    if not inside:
        raise CorruptFileError(f"{where} {relative!r} leads outside the artifact folder (a link); re-export the folder")
    return full


class Exporter(Protocol):
    """Turns one Bundle component into one artifact under `out` (a folder being written atomically).

    An exporter may also define `finish_folder(bundle, aset, out)`, called once all artifacts are final,
    to write the files its folder carries beside the graphs (pipeline index, manifest, README).
    """

    target: ClassVar[str]

    def export(self, bundle: Bundle, component: str, options: ExportOptions, out: Path) -> Artifact:
        ...


EXPORTERS: Registry[Exporter] = Registry("target", UserError, lambda name: f"unknown export target {name!r}")
register_exporter = EXPORTERS.register
get_exporter = EXPORTERS.create


# Backends that register themselves on import: each name is a module in export/ (its exporter), when
# present `<name>_quantize` beside it (its quantize step), and in runtimes/ (its adapter).
BUILTIN_BACKENDS: tuple[str, ...] = ("onnx", "coreml", "executorch")


def load_builtins() -> None:
    """Import every built-in exporter and runtime adapter so they register."""
    import importlib
    import importlib.util

    for name in BUILTIN_BACKENDS:
        for module in (f"pocketdiff.export.{name}", f"pocketdiff.export.{name}_quantize", f"pocketdiff.runtimes.{name}"):
            if importlib.util.find_spec(module) is not None:
                importlib.import_module(module)


def sampler_info(bundle: Bundle) -> dict[str, Any]:
    """What a runner needs beside the graphs: scheduler config, latent scaling and shape rules."""
    return {"scheduler": json.loads(json.dumps(dict(bundle.scheduler.config), default=str)),
            "scaling_factor": float(bundle.vae.config.scaling_factor),
            "vae_scale_factor": bundle.vae_scale_factor, "resolution": bundle.resolution,
            "latent_channels": int(bundle.unet.config.in_channels)}


class ExportStep(Protocol):
    """Work between exporting the artifacts and committing the folder (quantization and its gate)."""

    manifest_entry: dict[str, Any]  # recorded as artifacts.json "quantization"

    def finish(self, artifact: Artifact, folder: Path) -> Artifact:
        """The artifact after this step (its files under `folder` rewritten in place)."""
        ...

    def check(self, folder: Path, aset: ArtifactSet) -> None:
        """Raise (GateError) to refuse the whole folder; nothing is then written."""
        ...


def export_bundle(bundle: Bundle, model: str, targets: list[str], options: ExportOptions, out: Path,
                  log: Any = None, step: ExportStep | None = None) -> ArtifactSet:
    """Export every component for every target into `out`, atomically (a failure, or `step` refusing the
    artifacts, leaves `out` untouched)."""
    from ..fileio import atomic_dir

    load_builtins()
    exporters = [get_exporter(t) for t in targets]  # unknown targets fail before anything is written
    artifacts: list[Artifact] = []
    with atomic_dir(Path(out)) as tmp:
        for exporter in exporters:
            for component in options.components:
                if log:
                    log(f"{exporter.target}: exporting {component} ({options.precision})")
                artifact = exporter.export(bundle, component, options, tmp)
                artifacts.append(step.finish(artifact, tmp) if step else artifact)
        aset = ArtifactSet(model=model, artifacts=artifacts, sampler=sampler_info(bundle),
                           model_hash=bundle.manifest.content_hash,
                           quantization=step.manifest_entry if step else None)
        for exporter in exporters:
            if hasattr(exporter, "finish_folder"):  # its folder's own files, once every artifact is final
                exporter.finish_folder(bundle, aset, tmp)
        portable_configs(tmp)
        aset.save(tmp)
        if step:
            step.check(tmp, aset)
    return aset


def portable_configs(folder: Path) -> None:
    """Rewrite the JSON configs under an artifact folder without the build machine's absolute paths
    (`_name_or_path` and the like): a path inside the folder becomes relative, any other is dropped."""
    for path in sorted(Path(folder).rglob("*.json")):
        if path.name == MANIFEST or not (path.name in ("config.json", "model_index.json")
                                         or path.name.endswith("_config.json")):
            continue
        data = json.loads(path.read_text())
        clean = _without_build_paths(data, Path(folder).resolve())
        if clean != data:
            atomic_write_json(path, clean)


def _without_build_paths(value: Any, root: Path) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(item, str) and _is_absolute(item):
                inside = Path(item).resolve().is_relative_to(root)
                if inside:
                    out[key] = str(Path(item).resolve().relative_to(root))
                continue
            out[key] = _without_build_paths(item, root)
        return out
    if isinstance(value, list):
        return [_without_build_paths(v, root) for v in value]
    return value


def _is_absolute(text: str) -> bool:
    """A POSIX or Windows absolute path with at least one named component ("/" alone is not one)."""
    return (text.startswith("/") and len(PurePosixPath(text).parts) > 1) or PureWindowsPath(text).is_absolute()

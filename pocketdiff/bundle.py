"""The Bundle: a text-to-image pipeline in diffusers format plus pocketdiff's manifest.

A Bundle is what every stage reads and writes. On disk it is a diffusers pipeline folder
(model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/) that plain diffusers can
open, plus `pocketdiff.json`: where it came from, which passes made it, and what was measured.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from safetensors import SafetensorError, safe_open

from . import __version__
from .errors import ConfigError, CorruptFileError, InputPathError
from .fileio import atomic_dir, atomic_write_json, hash_tree

MANIFEST = "pocketdiff.json"
MODEL_COMPONENTS = ("text_encoder", "unet", "vae")
COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
_LIBRARIES = {"diffusers": diffusers, "transformers": transformers}

log = logging.getLogger(__name__)


@dataclass
class Manifest:
    """Provenance and figures of one Bundle, stored as pocketdiff.json beside the pipeline."""

    source: dict[str, Any] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    content_hash: str | None = None
    # How the model is meant to be sampled (scheduler, steps, guidance_scale): a distilled student's
    # step count and guidance travel with it, and generate / eval / validate / export default to them.
    sampling: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The pocketdiff.json contents."""
        return {"pocketdiff_version": __version__, "source": self.source, "passes": self.passes,
                "metrics": self.metrics, "content_hash": self.content_hash, "sampling": self.sampling}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """A Manifest from pocketdiff.json contents (missing keys default to empty)."""
        return cls(source=data.get("source", {}), passes=list(data.get("passes", [])),
                   metrics=dict(data.get("metrics", {})), content_hash=data.get("content_hash"),
                   sampling=dict(data.get("sampling", {})))


@dataclass
class Bundle:
    """The components of one text-to-image pipeline and its manifest."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: Any
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any = None
    manifest: Manifest = field(default_factory=Manifest)
    pipeline_class: str = "StableDiffusionPipeline"

    def components(self) -> dict[str, Any]:
        """Name -> component, for the components that are present."""
        return {n: getattr(self, n) for n in COMPONENTS if getattr(self, n) is not None}

    def modules(self) -> dict[str, torch.nn.Module]:
        """Name -> torch module, for the neural components that are present."""
        return {n: getattr(self, n) for n in MODEL_COMPONENTS if getattr(self, n) is not None}

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Bundle:
        """Move (and optionally cast) every neural component in place; returns self."""
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The native image side in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def save(self, path: str | Path) -> str:
        """Write the Bundle as a diffusers folder plus pocketdiff.json, atomically; return its hash."""
        with atomic_dir(Path(path)) as tmp:
            return self.write_into(tmp)

    def write_into(self, tmp: Path) -> str:
        """Write the pipeline files into the empty folder `tmp` (the caller makes it atomic); return the hash."""
        index: dict[str, Any] = {"_class_name": self.pipeline_class,
                                 "_diffusers_version": diffusers.__version__,
                                 "safety_checker": [None, None],
                                 "feature_extractor": [None, None],
                                 "requires_safety_checker": False}
        for name in COMPONENTS:
            comp = getattr(self, name)
            if comp is None:
                index[name] = [None, None]
                continue
            library = "transformers" if type(comp).__module__.startswith("transformers") else "diffusers"
            index[name] = [library, type(comp).__name__]
            if name in MODEL_COMPONENTS:
                comp.save_pretrained(tmp / name, safe_serialization=True)
            else:
                comp.save_pretrained(tmp / name)
        atomic_write_json(tmp / "model_index.json", index)
        self.manifest.content_hash = hash_tree(tmp, exclude=(MANIFEST,))
        atomic_write_json(tmp / MANIFEST, self.manifest.to_json())
        return self.manifest.content_hash

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> Bundle:
        """Open a diffusers pipeline folder; never runs code from it (safetensors only)."""
        path = Path(path)
        if not path.exists():
            raise InputPathError(f"{path}: no such file or folder")
        index_file = path / "model_index.json"
        if not path.is_dir() or not index_file.is_file():
            raise InputPathError(f"{path}: not a diffusers pipeline folder (no model_index.json); "
                                 "give a pipeline folder, a .safetensors checkpoint, 'fashion' or arch:NAME")
        try:
            index = json.loads(index_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{index_file}: not valid JSON ({e})") from e
        loaded: dict[str, Any] = {}
        for name in COMPONENTS:
            entry = index.get(name)
            if not entry or entry[0] is None:
                continue
            loaded[name] = _load_component(path / name, name, entry, dtype)
        for required in ("unet", "vae", "scheduler"):
            if required not in loaded:
                raise InputPathError(f"{path}: the pipeline has no {required}/ component")
        manifest_file = path / MANIFEST
        manifest = Manifest(source={"kind": "diffusers-folder", "path": str(path.resolve())})
        if manifest_file.is_file():
            manifest = Manifest.from_json(json.loads(manifest_file.read_text()))
        else:
            manifest.content_hash = hash_tree(path)
            manifest.source["hash"] = manifest.content_hash
        return cls(**loaded, manifest=manifest, pipeline_class=index.get("_class_name", "StableDiffusionPipeline"))


def check_safetensors(folder: Path) -> None:
    """Raise CorruptFileError for a missing or unreadable weights file in a component folder."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CorruptFileError(f"{folder}: no .safetensors weights (pickled .bin weights are "
                               "refused: convert them to safetensors)")
    for f in files:
        check_safetensors_file(f)


def check_safetensors_file(f: Path) -> list[str]:
    """The tensor names of safetensors file `f`; CorruptFileError if it is unreadable or truncated."""
    try:
        with safe_open(str(f), framework="pt") as st:
            keys = list(st.keys())
            for key in keys:
                st.get_slice(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"{f}: unreadable safetensors file ({e}); re-copy or re-export it") from e
    expected = _safetensors_end(f)
    if f.stat().st_size < expected:
        raise CorruptFileError(f"{f}: truncated ({f.stat().st_size} of {expected} bytes); re-copy it")
    return keys


def _safetensors_end(f: Path) -> int:
    """The byte length the safetensors header promises."""
    with f.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def _load_component(folder: Path, name: str, entry: list[str], dtype: torch.dtype) -> Any:
    library, class_name = entry[0], entry[1]
    if library not in _LIBRARIES or not hasattr(_LIBRARIES[library], class_name):
        raise ConfigError(f"{folder}: component class {library}.{class_name} is not one pocketdiff loads")
    if not folder.is_dir():
        raise InputPathError(f"{folder}: model_index.json lists {name} but the folder is missing")
    cls = getattr(_LIBRARIES[library], class_name)
    if name in MODEL_COMPONENTS:
        check_safetensors(folder)
        try:
            return cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True)
        except (ValueError, RuntimeError, OSError, KeyError, TypeError) as e:
            raise ConfigError(f"{folder}: the weights do not match config.json ({_first_line(e)})") from e
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{folder}: cannot load {name} ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__

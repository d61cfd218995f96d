"""The Bundle: a text-to-image pipeline in diffusers format plus pocketdiff's manifest.

A Bundle is what every stage reads and writes. On disk it is a diffusers pipeline folder
(model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/) that plain diffusers can
open, plus `pocketdiff.json`: where it came from, which passes made it, and what was measured.

Loading treats the folder as untrusted: every JSON file and every safetensors header is checked
(types, ranges, byte ranges against the file size) before any weights are read, weights come only
from safetensors, and a component whose weights do not cover its config is refused, never
returned half-loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

from . import __version__
from .errors import ConfigError, CorruptFileError, InputPathError, PocketdiffError
from .fileio import atomic_dir, atomic_write_json, hash_tree

MANIFEST = "pocketdiff.json"
MODEL_COMPONENTS = ("text_encoder", "unet", "vae")
COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
_LIBRARIES = {"diffusers": diffusers, "transformers": transformers}
_BASES = {"unet": diffusers.ModelMixin, "vae": diffusers.ModelMixin, "scheduler": diffusers.SchedulerMixin,
          "text_encoder": transformers.PreTrainedModel, "tokenizer": transformers.PreTrainedTokenizerBase}
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")

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
    def from_json(cls, data: Any, where: str = MANIFEST) -> Manifest:
        """A Manifest from pocketdiff.json contents (missing keys default to empty); CorruptFileError
        naming the key for a value of the wrong type."""
        if not isinstance(data, dict):
            raise CorruptFileError(f"{where}: must be a JSON object, got {type(data).__name__}; re-save the model")
        kinds = {"source": dict, "passes": list, "metrics": dict, "content_hash": (str, type(None)),
                 "sampling": dict}
        for key, kind in kinds.items():
            if key in data and not isinstance(data[key], kind):
                raise CorruptFileError(f"{where}: {key!r} has the wrong type ({type(data[key]).__name__}); "
                                       "re-save the model")
        if not all(isinstance(p, dict) for p in data.get("passes", [])):
            raise CorruptFileError(f"{where}: every entry of 'passes' must be an object")
        sampling = dict(data.get("sampling", {}))
        for key, value in sampling.items():
            problem = _SAMPLING.get(key, lambda v: "is not a sampling setting (scheduler, steps, guidance_scale)")(value)
            if problem:
                raise ConfigError(f"{where}: sampling.{key} {problem}")
        return cls(source=data.get("source", {}), passes=list(data.get("passes", [])),
                   metrics=dict(data.get("metrics", {})), content_hash=data.get("content_hash"), sampling=sampling)


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
        """Open a diffusers pipeline folder, checking every file before reading weights; never runs code
        from it (safetensors only)."""
        path = Path(path)
        if not path.exists():
            raise InputPathError(f"{path}: no such file or folder")
        if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
            raise CorruptFileError(f"{path}: pickled checkpoints are refused (loading one can run code from it); "
                                   "convert it to .safetensors")
        index_file = path / "model_index.json"
        if not path.is_dir() or not index_file.is_file():
            raise InputPathError(f"{path}: not a diffusers pipeline folder (no model_index.json); "
                                 "give a pipeline folder, a .safetensors checkpoint, 'fashion' or arch:NAME")
        index = read_json(index_file)
        classes = pipeline_classes(index, index_file)
        for name, component_cls in classes.items():
            check_component(path / name, name, component_cls)
        manifest_file = path / MANIFEST
        if manifest_file.is_file():
            manifest = Manifest.from_json(read_json(manifest_file), str(manifest_file))
        else:
            manifest = Manifest(source={"kind": "diffusers-folder", "path": str(path.resolve())})
            manifest.content_hash = manifest.source["hash"] = hash_tree(path)
        with quiet_progress():
            loaded = {name: _load_component(path / name, name, c, dtype) for name, c in classes.items()}
        return cls(**loaded, manifest=manifest, pipeline_class=index.get("_class_name", "StableDiffusionPipeline"))


def read_json(path: Path) -> Any:
    """The parsed contents of JSON file `path`; CorruptFileError naming it if it is not valid JSON."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too-long ints
        raise CorruptFileError(f"{path}: not valid JSON ({first_line(e)}); re-copy or re-save it") from e
    except OSError as e:
        raise InputPathError(f"{path}: cannot be read ({first_line(e)})") from e


def pipeline_classes(index: Any, index_file: Path) -> dict[str, type]:
    """Component name -> class for every component model_index.json lists; ConfigError naming the key."""
    if not isinstance(index, dict):
        raise ConfigError(f"{index_file}: must be a JSON object mapping components to [library, class], "
                          f"got {type(index).__name__}")
    if not isinstance(index.get("_class_name", ""), str):
        raise ConfigError(f"{index_file}: '_class_name' must be a string")
    classes = {}
    for name in COMPONENTS:
        entry = index.get(name)
        if entry is None or entry == [None, None]:
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise ConfigError(f"{index_file}: {name!r} must be [library, class] (two strings) or [null, null], "
                              f"got {json.dumps(entry)[:80]}")
        classes[name] = _component_class(index_file, name, *entry)
    for required in ("unet", "vae", "scheduler"):
        if required not in classes:
            raise InputPathError(f"{index_file.parent}: the pipeline has no {required}/ component")
    return classes


def _component_class(index_file: Path, name: str, library: str, class_name: str) -> type:
    bad = ConfigError(f"{index_file}: {name!r} names {library}.{class_name}, which is not a {name} class "
                      "pocketdiff loads")
    if library not in _LIBRARIES or not class_name.isidentifier() or class_name.startswith("_"):
        raise bad
    try:
        found = getattr(_LIBRARIES[library], class_name)
    except Exception as e:  # a lazy module raises AttributeError, ImportError or RuntimeError for odd names
        raise bad from e
    if not (isinstance(found, type) and issubclass(found, _BASES[name])):
        raise bad
    return found


# --- component configs: the keys pocketdiff and diffusers rely on, checked for type and range ----------

Check = Callable[[Any], str | None]  # the problem with a value, or None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int, hi: int) -> Check:
    return lambda v: None if _is_int(v) and lo <= v <= hi else f"must be an integer from {lo} to {hi}, got {v!r}"


def _num(lo: float, hi: float, closed: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and (lo <= v if closed else lo < v) and v <= hi)
        return None if ok else f"must be a number {'>=' if closed else '>'} {lo} and <= {hi}, got {v!r}"
    return check


def _ints(lo: int, hi: int, max_len: int = 8, scalar: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if scalar and _is_int(v) and lo <= v <= hi:
            return None
        if isinstance(v, list) and 1 <= len(v) <= max_len and all(_is_int(x) and lo <= x <= hi for x in v):
            return None
        what = "an integer or a list" if scalar else "a list"
        return f"must be {what} of 1 to {max_len} integers from {lo} to {hi}, got {v!r}"
    return check


def _strs(v: Any) -> str | None:
    return None if isinstance(v, list) and 1 <= len(v) <= 8 and all(isinstance(x, str) for x in v) \
        else f"must be a list of 1 to 8 block names, got {v!r}"


def _choice(*values: str) -> Check:
    return lambda v: None if isinstance(v, str) and v in values else f"must be one of {', '.join(values)}, got {v!r}"


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _betas(v: Any) -> str | None:
    ok = v is None or (isinstance(v, list) and 1 <= len(v) <= 100_000 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < 1 for x in v))
    return None if ok else "must be null or a list of numbers between 0 and 1"


_SIZE, _CHANNELS = _ints(1, 4096, 2, scalar=True), _ints(1, 16384)
_SAMPLING: dict[str, Check] = {"scheduler": lambda v: None if isinstance(v, str) else f"must be a string, got {v!r}",
                               "steps": _int(1, 1000), "guidance_scale": _num(0, 100, closed=True)}
_IMAGE_MODEL = {"sample_size": _SIZE, "in_channels": _int(1, 64), "out_channels": _int(1, 64),
                "block_out_channels": _CHANNELS, "down_block_types": _strs, "up_block_types": _strs,
                "norm_num_groups": _optional(_int(1, 16384))}
CONFIG_CHECKS: dict[str, tuple[str, dict[str, Check]]] = {
    "unet": ("config.json", {**_IMAGE_MODEL, "layers_per_block": _ints(1, 16, scalar=True),
                             "cross_attention_dim": _ints(1, 16384, scalar=True),
                             "attention_head_dim": _ints(1, 16384, scalar=True),
                             "transformer_layers_per_block": _ints(1, 64, scalar=True)}),
    "vae": ("config.json", {**_IMAGE_MODEL, "layers_per_block": _int(1, 16), "latent_channels": _int(1, 64),
                            "scaling_factor": _num(0, 100)}),
    "scheduler": ("scheduler_config.json", {
        "num_train_timesteps": _int(1, 100_000), "beta_start": _num(0, 1), "beta_end": _num(0, 1),
        "beta_schedule": _choice("linear", "scaled_linear", "squaredcos_cap_v2"),
        "prediction_type": _choice("epsilon", "v_prediction", "sample"),
        "timestep_spacing": _choice("leading", "trailing", "linspace"), "steps_offset": _int(0, 1000),
        "clip_sample": _bool, "set_alpha_to_one": _bool, "trained_betas": _betas}),
    "text_encoder": ("config.json", {k: _int(1, n) for k, n in (
        ("hidden_size", 16384), ("intermediate_size", 65536), ("num_hidden_layers", 128),
        ("num_attention_heads", 256), ("vocab_size", 1_000_000), ("max_position_embeddings", 65536))}),
    "tokenizer": ("tokenizer_config.json", {"model_max_length": _int(1, 10**30)}),
}


def check_config(folder: Path, name: str) -> dict[str, Any] | None:
    """Component `name`'s config file in `folder`, checked for the keys pocketdiff relies on (ConfigError
    naming file and key); None when the component has no config file (a tokenizer may not)."""
    filename, checks = CONFIG_CHECKS[name]
    path = folder / filename
    if not path.is_file():
        if name == "tokenizer":
            return None
        raise InputPathError(f"{folder}: no {filename}; the {name} folder is incomplete")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: must be a JSON object, got {type(config).__name__}")
    for key, check in checks.items():
        if key in config and (problem := check(config[key])):
            raise ConfigError(f"{path}: {key} {problem}")
    return config


def check_component(folder: Path, name: str, component_cls: type) -> None:
    """Everything about one component folder that can be checked before loading it: it exists, its config
    is well typed, and its weights are safetensors files whose headers match their sizes."""
    if not folder.is_dir():
        raise InputPathError(f"{folder}: model_index.json lists {name} but the folder is missing")
    config = check_config(folder, name)
    if name in MODEL_COMPONENTS:
        _check_size(folder, name, component_cls, config, check_safetensors(folder))


def _check_size(folder: Path, name: str, cls: type, config: dict[str, Any], stored: dict[str, TensorEntry]) -> None:
    """ConfigError when the config describes more parameters than the weights hold, naming the tensors that
    differ: built on the meta device, so a hostile config never allocates, and loading never fills the gap
    with random values. (Names are compared only here: libraries rename legacy keys while loading.)"""
    try:
        with torch.device("meta"):
            if issubclass(cls, diffusers.ModelMixin):
                module = cls.from_config(config)
            else:
                module = cls(cls.config_class.from_dict(config))
    except Exception as e:  # diffusers / transformers reject inconsistent configs with untyped errors
        raise ConfigError(f"{folder}: config.json does not describe a {name} ({first_line(e)})") from e
    needed, held = sum(p.numel() for p in module.parameters()), sum(math.prod(e.shape) for e in stored.values())
    if needed > held:
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        check_tensor_sets(str(folder), want.keys() - stored.keys(), stored.keys() - want.keys(),
                          {k: f"file {list(stored[k].shape)}, config {list(want[k])}" for k in want.keys() & stored.keys()
                           if want[k] != stored[k].shape}, f"fix {name}/config.json or re-save the folder")
        raise ConfigError(f"{folder}: config.json describes {needed:,} parameters but the weights hold {held:,}: "
                          f"the config and weights are of different models; fix {name}/config.json or re-save")


# --- safetensors: the header parsed and checked before any library trusts it --------------------------

SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype, shape and byte range inside the data area."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def check_safetensors(folder: Path) -> dict[str, TensorEntry]:
    """The tensors of a component folder's weights files by name; CorruptFileError for a missing or
    unreadable weights file."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        what = f" ({', '.join(pickled)} is pickled, and pickles are refused: they can run code)" if pickled else ""
        raise CorruptFileError(f"{folder}: no .safetensors weights{what}; convert the weights to safetensors")
    return {name: e for f in files for name, e in check_safetensors_file(f).items()}


def check_safetensors_file(f: Path) -> dict[str, TensorEntry]:
    """The tensors of safetensors file `f` by name; CorruptFileError, naming the file and the tensor, for a
    header that lies about the file (sizes, offsets, dtypes, overlaps). Reads only the header, and only
    after checking its declared length against the file size."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise _corrupt(f, f"{size} bytes is too short for a safetensors file")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise _corrupt(f, f"declares a {n}-byte header but the file holds {size} bytes"
                              + (" (the limit is 100 MB)" if n > MAX_HEADER_BYTES else "")
                              + ": truncated, or not a safetensors file")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise _corrupt(f, f"the header is not valid JSON ({first_line(e)})") from e
    if not isinstance(header, dict):
        raise _corrupt(f, "the header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _corrupt(f, "__metadata__ must map names to strings")
    entries = {name: _entry(f, name, value) for name, value in header.items()}
    _check_layout(f, entries, size - 8 - n)
    return entries


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _entry(f: Path, name: str, value: Any) -> TensorEntry:
    if not isinstance(value, dict) or set(value) != _ENTRY_KEYS:
        raise _corrupt(f, f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise _corrupt(f, f"tensor {name!r} has dtype {dtype!r}, not one of {', '.join(SAFETENSORS_DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= 16 and all(_is_int(d) and d >= 0 for d in shape)):
        raise _corrupt(f, f"tensor {name!r} has shape {str(shape)[:80]}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _corrupt(f, f"tensor {name!r} has data_offsets {str(offsets)[:80]}, not [start, end]")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _corrupt(f, f"tensor {name!r} ({dtype} {shape}) needs {nbytes} bytes but its range holds "
                          f"{offsets[1] - offsets[0]}")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(f: Path, entries: dict[str, TensorEntry], data_bytes: int) -> None:
    """The byte ranges must tile the data area exactly: no gap, no overlap, nothing past the end."""
    for name, e in entries.items():
        if e.end > data_bytes:
            raise _corrupt(f, f"tensor {name!r} ends at byte {e.end} of the data but the file holds {data_bytes}: "
                              "truncated; re-copy it")
    position, previous = 0, None
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start < position:
            raise _corrupt(f, f"tensors {previous!r} and {name!r} overlap")
        if e.start > position:
            raise _corrupt(f, f"{e.start - position} unused bytes before tensor {name!r}")
        position, previous = e.end, name
    if position != data_bytes:
        raise _corrupt(f, f"{data_bytes - position} bytes after the last tensor")


def _corrupt(f: Path, problem: str) -> CorruptFileError:
    return CorruptFileError(f"{f}: not a valid safetensors file: {problem}")


# --- loading, and refusing a half-loaded module ---------------------------------------------------------

_HARMLESS_EXTRA = re.compile(r"(^|\.)(position_ids|logit_scale|text_projection(\.weight)?)$")


def describe_tensors(kind: str, names: list[str] | set[str], limit: int = 4) -> str:
    """'3 missing (a, b, c)': a count and the first few names, for error messages."""
    names = sorted(names)
    more = f", … {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} {kind} ({', '.join(names[:limit])}{more})"


def check_tensor_sets(where: str, missing: set[str], extra: set[str], misshaped: dict[str, str], hint: str) -> None:
    """ConfigError naming every missing, extra (beyond known-harmless buffers) or mis-shaped tensor."""
    extra = {k for k in extra if not _HARMLESS_EXTRA.search(k)}
    if not (missing or extra or misshaped):
        return
    parts = [describe_tensors(kind, names) for kind, names in
             (("missing", missing), ("unexpected", extra),
              ("mis-shaped", [f"{k}: {v}" for k, v in misshaped.items()])) if names]
    raise ConfigError(f"{where}: the weights do not match the config: {'; '.join(parts)}; {hint}")


def check_materialized(module: torch.nn.Module, where: str) -> None:
    """ConfigError if any parameter or buffer of `module` was never loaded (still on the meta device)."""
    empty = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if empty:
        raise ConfigError(f"{where}: {describe_tensors('tensors never loaded', empty)}; the weights file "
                          "lacks them: re-export or re-convert the model")


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No diffusers / transformers progress bars while loading (a CLI error stays one line)."""
    libs = (diffusers.utils.logging, transformers.utils.logging)
    enabled = [lib.is_progress_bar_enabled() for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in zip(libs, enabled):
            if was:
                lib.enable_progress_bar()


def _load_component(folder: Path, name: str, cls: type, dtype: torch.dtype) -> Any:
    """One checked component; library errors at this boundary become ConfigError naming the folder."""
    try:
        if name not in MODEL_COMPONENTS:
            return cls.from_pretrained(folder, local_files_only=True)
        module, info = cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True,
                                           output_loading_info=True)
    except PocketdiffError:
        raise
    except Exception as e:  # diffusers / transformers raise many untyped errors for a bad config
        raise ConfigError(f"{folder}: cannot load {name} ({first_line(e)})") from e
    check_tensor_sets(str(folder), set(info.get("missing_keys", ())), set(info.get("unexpected_keys", ())),
                      {k: str(v) for k, *v in info.get("mismatched_keys", ())},
                      f"fix {name}/config.json or re-save the folder")
    check_materialized(module, str(folder))
    return module


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for one-line errors."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__

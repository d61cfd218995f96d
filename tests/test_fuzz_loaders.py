"""Property tests for the loaders of untrusted files: any input ends in success or a PocketdiffError.

Targets: the safetensors header check (random headers, lying lengths and offsets, byte blobs), the
artifact manifest reader (random artifacts.json), and the model-folder loader (random values in
model_index.json, component configs and pocketdiff.json). A seeded slice runs here in seconds;
`bench/fuzz_loaders.py` runs the same targets with a large count.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from safetensors import safe_open

from pocketdiff.bundle import SAFETENSORS_DTYPES, Bundle, check_safetensors_file
from pocketdiff.errors import PocketdiffError
from pocketdiff.export.base import ArtifactSet

JSON_LEAF = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
             | st.text(max_size=12) | st.sampled_from(["/etc/passwd", "../x", "fp32", "unet", "onnx", "F32", "linear"]))
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=12)


def outcome(call: Any) -> str:
    """'ok' or the PocketdiffError class name; any other exception fails the property."""
    try:
        call()
    except PocketdiffError as e:
        assert str(e).strip() and "\n" not in str(e), f"not a one-line message: {e!r}"
        return type(e).__name__
    return "ok"


# --- safetensors ---------------------------------------------------------------------------------------

@st.composite
def safetensors_bytes(draw: st.DrawFn) -> bytes:
    """A valid safetensors file, then at most one lie: in the length prefix, an entry, the layout or the data."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=0, max_size=4, unique=True))
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    lie = draw(st.sampled_from(["none", "entry", "metadata", "offsets", "header", "data", "length", "raw"]))
    if lie == "entry" and names:
        header[draw(st.sampled_from(names))][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON)
    elif lie == "metadata":
        header["__metadata__"] = draw(JSON)
    elif lie == "offsets" and names:
        entry = header[draw(st.sampled_from(names))]
        entry["data_offsets"] = [o + draw(st.integers(-8, 8)) for o in entry["data_offsets"]]
    elif lie == "header":
        header = draw(JSON)
    text = json.dumps(header).encode()
    data = b"\0" * offset
    if lie == "data":
        data = data[:draw(st.integers(0, offset))] + b"\0" * draw(st.integers(0, 8))
    n = len(text)
    if lie == "length":
        n = draw(st.sampled_from([0, 1, 2**60, 2**64 - 1, 100_000_001]) | st.integers(0, n + 16))
    if lie == "raw":
        return draw(st.binary(max_size=64))
    return struct.pack("<Q", n) + text + data


def check_safetensors_bytes(tmp: Path, blob: bytes) -> str:
    """The property for one file: success or a pocketdiff error; a file it accepts, safetensors opens alike."""
    f = tmp / "fuzz.safetensors"
    f.write_bytes(blob)
    result = outcome(lambda: check_safetensors_file(f))
    if result == "ok":
        with safe_open(str(f), framework="numpy") as st_file:
            assert sorted(st_file.keys()) == sorted(check_safetensors_file(f))
    return result


# --- artifacts.json ------------------------------------------------------------------------------------

GOOD_ARTIFACT = {"target": "onnx", "component": "unet", "path": "onnx/unet/model.onnx", "precision": "fp32",
                 "inputs": {"sample": {"shape": ["batch", 4, "height", "width"], "dtype": "float32"}},
                 "outputs": {"out_sample": {"shape": ["batch", 4, "height", "width"], "dtype": "float32"}},
                 "shapes": [{"sample": [1, 4, 8, 8]}], "details": {}}


@st.composite
def manifests(draw: st.DrawFn) -> Any:
    """A valid artifacts.json with random values put at random keys, or random JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    artifact = json.loads(json.dumps(GOOD_ARTIFACT))
    data: dict[str, Any] = {"model": "arch:tiny", "model_hash": None, "sampler": {}, "artifacts": [artifact]}
    for _ in range(draw(st.integers(0, 3))):
        inner = artifact.get("inputs", {}).get("sample") if isinstance(artifact.get("inputs"), dict) else None
        where = draw(st.sampled_from([w for w in (data, artifact, inner) if isinstance(w, dict)]))
        key = draw(st.sampled_from(sorted(where)) | st.text(max_size=6))
        where[key] = draw(JSON)
    return data


def check_manifest(tmp: Path, data: Any) -> str:
    """The property for one artifacts.json: success or a pocketdiff error, and an accepted path stays inside."""
    (tmp / "artifacts.json").write_text(json.dumps(data))
    result = outcome(lambda: ArtifactSet.load(tmp))
    if result == "ok":
        for a in ArtifactSet.load(tmp).artifacts:
            assert (tmp / a.path).resolve().is_relative_to(tmp.resolve())
    return result


# --- model folders -------------------------------------------------------------------------------------

FOLDER_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                "text_encoder/config.json", "tokenizer/tokenizer_config.json", "pocketdiff.json")


@st.composite
def folder_edits(draw: st.DrawFn) -> tuple[str, Any]:
    """(file, new contents): a random value at a random (mostly existing) key, or random JSON / bytes."""
    file = draw(st.sampled_from(FOLDER_FILES))
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return file, draw(st.binary(max_size=32))
    if kind == 1:
        return file, draw(JSON)
    return file, ("set", draw(st.text(max_size=8)) if kind == 2 else None, draw(JSON))


def check_folder_edit(folder: Path, originals: dict[str, bytes], edit: tuple[str, Any]) -> str:
    """The property for one edited model folder: Bundle.load succeeds or raises a pocketdiff error."""
    file, change = edit
    path = folder / file
    if isinstance(change, bytes):
        path.write_bytes(change)
    elif isinstance(change, tuple):
        data = json.loads(originals[file])
        key = change[1] if change[1] is not None else sorted(data)[len(json.dumps(change[2])) % len(data)]
        data[key] = change[2]
        path.write_text(json.dumps(data))
    else:
        path.write_text(json.dumps(change))
    try:
        return outcome(lambda: Bundle.load(folder))
    finally:
        path.write_bytes(originals[file])


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    from pocketdiff.zoo import build_arch

    folder = tmp_path_factory.mktemp("fuzz") / "tiny"
    build_arch("tiny", seed=0).save(folder)
    return folder, {f: (folder / f).read_bytes() for f in FOLDER_FILES}


SLICE = settings(max_examples=300, deadline=None, derandomize=False,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@seed(12)
@SLICE
@given(blob=safetensors_bytes())
def test_safetensors_header_check_never_crashes(tmp_path: Path, blob: bytes) -> None:
    check_safetensors_bytes(tmp_path, blob)


@seed(12)
@SLICE
@given(data=manifests())
def test_artifact_manifest_reader_never_crashes(tmp_path: Path, data: Any) -> None:
    check_manifest(tmp_path, data)


@seed(12)
@settings(SLICE, max_examples=25)
@given(edit=folder_edits())
def test_model_folder_loader_never_crashes(tiny_pipeline_dir: tuple[Path, dict[str, bytes]],
                                           edit: tuple[str, Any]) -> None:
    check_folder_edit(*tiny_pipeline_dir, edit)

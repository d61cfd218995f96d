"""Fashion-MNIST from local idx files, and the captions the built-in teacher is trained on.

The images come from Debian's `dataset-fashion-mnist` package or any folder holding the four idx
files (gzipped or not); `POCKETDIFF_DATA` points at such a folder. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TEMPLATES = (
    "a photo of a {}",
    "{}, product shot",
    "a {} on a plain background",
    "a picture of a {}",
    "{}",
    "a black and white photo of a {}",
    "a catalogue image of a {}",
    "a close-up photo of a {}",
)
IMAGE_SIZE = 64
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def data_root(root: str | Path | None = None) -> Path:
    """The folder with the idx files: `root`, else $POCKETDIFF_DATA, else Debian's location."""
    return Path(root or os.environ.get("POCKETDIFF_DATA") or DEFAULT_ROOT)


def _find_idx(folder: Path, stem: str) -> Path:
    """The idx file `stem` (gzipped or not) in `folder`; DataError saying how to get it if absent."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {folder}: install it with "
                    "`apt-get install -y dataset-fashion-mnist`, or set POCKETDIFF_DATA to a folder "
                    "holding the four idx files")


def _read_bytes(path: Path, n: int | None = None) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read() if n is None else f.read(n)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable idx file ({e})") from e


def _idx_dims(path: Path, raw: bytes) -> list[int]:
    """The dimensions an idx file's header declares; DataError unless it is an unsigned-byte idx file."""
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 8 or len(raw) < 4 + 4 * raw[3]:
        raise DataError(f"{path}: not an unsigned-byte idx file")
    return [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(raw[3])]


def _read_idx(folder: Path, stem: str) -> np.ndarray:
    path = _find_idx(folder, stem)
    raw = _read_bytes(path)
    dims = _idx_dims(path, raw)
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * len(dims))
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated idx file ({body.size} of {int(np.prod(dims))} values)")
    return body.reshape(dims)


def _split(split: str) -> tuple[str, str]:
    if split not in _FILES:
        raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
    return _FILES[split]


def load_fashion_mnist(split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) for split 'train' or 'test'."""
    folder = data_root(root)
    images = _read_idx(folder, _split(split)[0])
    labels = _read_idx(folder, _split(split)[1]).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{folder}: images and labels of split {split!r} do not match")
    return images, labels


def split_info(split: str, root: str | Path | None = None) -> tuple[int, str]:
    """(image count from the header, fingerprint of the image file: path, size, mtime) of a split, without
    reading the images: checks the data before any work and keys caches on the data actually used."""
    path = _find_idx(data_root(root), _split(split)[0])
    dims = _idx_dims(path, _read_bytes(path, 16))
    if len(dims) != 3:
        raise DataError(f"{path}: holds {len(dims)}-d data, not [N, 28, 28] images")
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return dims[0], key


def to_model_images(images: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 3, size, size] in [-1, 1]: the teacher's image space."""
    x = torch.as_tensor(images).float().div(127.5).sub(1.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1, 1).expand(-1, 3, -1, -1).contiguous()


def caption_set() -> list[str]:
    """Every distinct training caption; index 0 is the empty caption used for guidance."""
    return [""] + [t.format(c) for c in CLASSES for t in TEMPLATES]


def caption_index(label: int, template: int) -> int:
    """Index into `caption_set()` of class `label` written with template `template`."""
    return 1 + label * len(TEMPLATES) + template


def class_prompts(n_per_class: int, template: int = 0) -> tuple[list[str], list[int]]:
    """Prompts cycling through the classes (for evaluation), with their class labels."""
    labels = [i % len(CLASSES) for i in range(n_per_class * len(CLASSES))]
    return [TEMPLATES[template].format(CLASSES[c]) for c in labels], labels

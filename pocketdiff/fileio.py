"""Output paths, atomic writes and content hashing: a failed stage never leaves a half-written artifact,
and no command replaces a folder that is not its own.

Every command that writes checks its output path first (`prepare_output_dir`, `prepare_output_file`),
before any expensive work. Written files get mode 0666 and folders 0777, less the umask (0644 / 0755
under the usual umask), as plain `open` and `mkdir` would give them.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputPathError

_CHUNK = 1 << 22
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux's /proc)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_replaceable(final: Path, flag: str) -> None:
    """InputPathError unless `final` may become a folder this process writes: not a file or a link, and
    neither the current folder nor a folder that contains it."""
    if final.is_symlink():
        raise InputPathError(f"{flag} {final}: is a symbolic link; give the folder it points to, or a new name")
    if final.exists() and not final.is_dir():
        raise InputPathError(f"{flag} {final}: is a file, not a folder; give a new folder name")
    here, target = Path.cwd().resolve(), final.resolve()
    if target == here or target in here.parents:
        raise InputPathError(f"{flag} {final}: is the current folder or contains it, so it cannot be replaced; "
                             "give a new folder name")


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(where: Path, path: Path, flag: str) -> None:
    """InputPathError unless a file can be created in `where`'s nearest existing folder (tried for real)."""
    folder = _nearest_existing(where)
    if not folder.is_dir():
        raise InputPathError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputPathError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e})") from None


def prepare_output_dir(path: Path, marker: str, overwrite: bool = False, flag: str = "--out") -> Path:
    """Check, before any work, that folder `path` may be written (and later replaced) by a command whose
    folders hold the file `marker`; returns `path` made absolute.

    Allowed: a new folder, an empty one, one that holds `marker` (an earlier output of the same kind),
    or any folder when `overwrite`. Refused with InputPathError: a file, a link, the current folder or a
    folder containing it, and a place where nothing can be written.
    """
    path = Path(os.path.abspath(path))
    with _path_errors(path, flag):
        _check_replaceable(path, flag)
        if path.is_dir() and not overwrite and not (path / marker).is_file() and any(path.iterdir()):
            raise InputPathError(f"{flag} {path}: folder exists and is not an earlier output of this command "
                                 f"(no {marker}); its files would be replaced, so give a new folder or pass --overwrite")
        _check_writable(path.parent, path, flag)
    return path


def prepare_output_file(path: Path, flag: str) -> Path:
    """Check, before any work, that the file `path` can be written (an existing file is replaced);
    returns it made absolute. InputPathError for a folder or an unwritable place."""
    path = Path(os.path.abspath(path))
    with _path_errors(path, flag):
        if path.is_dir():
            raise InputPathError(f"{flag} {path}: is a folder; give a file name")
        _check_writable(path.parent, path, flag)
    return path


@contextlib.contextmanager
def _path_errors(path: Path, flag: str) -> Iterator[None]:
    """The OS refusing to look at a path (name too long, a NUL byte, no permission) as InputPathError."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise InputPathError(f"{flag} {path}: unusable path ({getattr(e, 'strerror', None) or e})") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(final: Path) -> None:
    """Remove what a killed process left beside `final`; a `final` killed mid-swap gets its old self back."""
    name = re.escape(final.name)
    for p in final.parent.glob(f".{glob.escape(final.name)}.*"):
        m = re.fullmatch(rf"\.{name}\.(tmp|old)-(\d+)(-.+)?", p.name)
        if m is None or _alive(int(m[2])):
            continue
        if m[1] == "old" and not final.exists():
            os.replace(p, final)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, so a swap of folders is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final`, on error it is removed.

    `final` must be a folder or absent (a file is refused, as is the current folder); check it with
    `prepare_output_dir` before the work that fills it.
    """
    final = Path(os.path.abspath(final))
    _check_replaceable(final, "output")
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with _signals_deferred():
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def json_safe(obj: Any) -> Any:
    """`obj` with NaN and infinities as None and numpy scalars as Python numbers: strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def json_text(obj: Any, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Strict JSON (no NaN: None instead) of `obj`; objects JSON does not know are written as strings."""
    return json.dumps(json_safe(obj), indent=indent, sort_keys=sort_keys, default=str, allow_nan=False)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented strict JSON, atomically."""
    atomic_write_bytes(path, (json_text(obj, sort_keys=True) + "\n").encode())


def hash_tree(root: Path, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over every file under `root` (relative path and bytes), in sorted order."""
    h = hashlib.sha256()
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude)
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        _update(h, p)
    return h.hexdigest()


def hash_file(path: Path) -> str:
    """sha256 of one file's bytes."""
    h = hashlib.sha256()
    _update(h, Path(path))
    return h.hexdigest()


def _update(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def hash_json(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

"""Typed settings: dataclasses read from TOML tables or CLI flags and checked when read.

One module serves recipes (`[[pass]]` tables, nested tables included), `[sample]`, and the CLI:
a typo or an out-of-range value fails when the recipe or the command line is read, naming the
setting, not hours later inside training. Types understood: bool, int, float, str, Path,
`Literal[...]`, `X | None`, `list[X]`, `tuple[X, ...]`, `tuple[X, Y]` and nested dataclasses.
Ranges and help text live in the field's metadata, written with `setting(...)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from .errors import RecipeError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def setting(default: Any = _MISSING, *, help: str = "", min: float | None = None, max: float | None = None,
            min_exclusive: bool = False, default_factory: Any = _MISSING) -> Any:
    """A dataclass field with help text and an allowed range (inclusive unless `min_exclusive`)."""
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def type_name(tp: Any) -> str:
    """How a type is written in error messages: 'int', 'list of float', 'one of "a", "b"'."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in inner) + " (or absent)"
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"list of {len(args)} values ({', '.join(type_name(a) for a in args)})"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """`value` checked against type `tp` (ints widen to float; lists become tuples where asked)."""
    origin, args = get_origin(tp), get_args(tp)
    bad = RecipeError(f"{where} must be {type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise bad
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except RecipeError:
                continue
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            items = [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return parse(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if math.isnan(value):
                raise RecipeError(f"{where} must be a number, got NaN")
            return value
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value)
        raise bad
    raise RecipeError(f"{where}: settings of type {tp!r} are not supported")


def _check_range(f: dataclasses.Field, value: Any, where: str) -> None:
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if lo is not None and (v < lo or (f.metadata.get("min_exclusive") and v == lo)):
            op = ">" if f.metadata.get("min_exclusive") else ">="
            raise RecipeError(f"{where} must be {op} {lo}, got {v!r}")
        if hi is not None and v > hi:
            raise RecipeError(f"{where} must be <= {hi}, got {v!r}")
        if isinstance(v, float) and math.isinf(v):
            raise RecipeError(f"{where} must be finite, got {v!r}")


def parse(cls: type[T], raw: dict[str, Any], where: str = "settings") -> T:
    """An instance of dataclass `cls` from a plain table; RecipeError naming the key on any mistake.

    `__post_init__` may raise ValueError for checks across fields; it becomes a RecipeError too.
    """
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise RecipeError(f"{where} has no setting {unknown[0]!r}; settings: {', '.join(fields) or 'none'}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        name = f"{where}.{key}"
        values[key] = _coerce(hints[key], value, name)
        _check_range(fields[key], values[key], name)
    missing = [n for n, f in fields.items() if n not in values and f.default is _MISSING
               and f.default_factory is _MISSING]
    if missing:
        raise RecipeError(f"{where} needs setting {missing[0]!r}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: {e}") from e


def as_plain(obj: Any) -> Any:
    """A settings instance as TOML/JSON-ready data (tuples to lists, Paths to strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [as_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One `--flag` per field of `cls` (nested dataclasses as `--outer-inner`), typed and defaulted."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        flag = "--" + (prefix + f.name).replace("_", "-")
        if dataclasses.is_dataclass(tp):
            add_flags(parser, tp, prefix=f"{prefix}{f.name}_")
            continue
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": None,
                                  "help": f"{f.metadata.get('help', '')} ({type_name(tp)}; default "
                                          f"{_default(f)!r})".strip()}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _flag_parser(tp)
            kwargs["metavar"] = type_name(tp).split(" ")[0].upper() if get_origin(tp) is not Literal else None
            if get_origin(tp) in (list, tuple):
                kwargs["metavar"] = "A,B,..."
        parser.add_argument(flag, **kwargs)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not _MISSING else f.default


def _flag_parser(tp: Any) -> Any:
    origin, args = get_origin(tp), get_args(tp)

    def convert(text: str) -> Any:
        if origin in (list, tuple):
            return [_scalar(args[0], part.strip()) for part in text.split(",") if part.strip()]
        return _scalar(tp, text)
    return convert


def _scalar(tp: Any, text: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none":
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return text if text in args else _literal_number(text, args)
    try:
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {type_name(tp)}, got {text!r}") from None
    return Path(text) if tp is Path else text


def _literal_number(text: str, args: tuple) -> Any:
    for a in args:
        if str(a) == text:
            return a
    raise argparse.ArgumentTypeError(f"expected {type_name(Literal[args])}, got {text!r}")


def from_flags(cls: type[T], args: argparse.Namespace, where: str = "flags", prefix: str = "") -> T:
    """An instance of `cls` from flags `add_flags` made: given flags override the defaults, checked as `parse`."""
    return parse(cls, _flag_values(cls, args, prefix), where)


def _flag_values(cls: type, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    raw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            nested = _flag_values(hints[f.name], args, f"{prefix}{f.name}_")
            if nested:
                raw[f.name] = nested
            continue
        value = getattr(args, prefix + f.name, None)
        if value is not None:
            raw[f.name] = value
    return raw

"""Property-based tests: every command line, sampling value, output path, JSON result and recipe ends in
success or one of pocketdiff's own errors, never another exception.

A seeded slice runs here in seconds; `bench/fuzz.py` runs the same properties over >= 100,000 inputs
and prints the counts (`OUTCOMES` tallies how each input ended, one count per input).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import fields
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketdiff.cli import UsageError, build_parser
from pocketdiff.errors import PocketdiffError
from pocketdiff.fileio import json_text, prepare_output_dir
from pocketdiff.passes import PASSES, get_pass
from pocketdiff.recipe import SampleSettings, load_recipe
from pocketdiff.sampler import SampleConfig

# The suite's seeded slice; bench/fuzz.py sets POCKETDIFF_FUZZ_EXAMPLES to run many more, randomly.
_EXAMPLES = int(os.environ.get("POCKETDIFF_FUZZ_EXAMPLES", "150"))
SLICE = settings(max_examples=_EXAMPLES, derandomize="POCKETDIFF_FUZZ_EXAMPLES" not in os.environ, deadline=None,
                 database=None, suppress_health_check=list(HealthCheck))
OUTCOMES: Counter[tuple[str, str]] = Counter()
PARSER = build_parser()
SANDBOX = Path(tempfile.mkdtemp(prefix="pocketdiff-fuzz-"))
_NEVER = {"-h", "--help", "--version"}  # they print and exit 0 by design


def _flags() -> dict[str, list[str]]:
    """Every option string of every subcommand, read from the parser itself."""
    sub = next(a for a in PARSER._actions if a.dest == "command")
    return {name: sorted(o for a in p._actions for o in a.option_strings if o not in _NEVER)
            for name, p in sub.choices.items()}


FLAGS = _flags()
ALL_FLAGS = sorted({f for fs in FLAGS.values() for f in fs})
TOKENS = st.one_of(
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "0", "-1", "1", "2", "7", "64", "4097", "nan", "-inf", "1e309", "0x10", "arch:tiny",
                     "fashion", "onnx", "onnx,onnx", "coreml,bogus", ",", ".", "..", "/", "ddim", "lcm", "iOS17",
                     "fp16", "cuda", "--", "-", "a b", "é", "\x00"]),
    st.text(max_size=10),
)


# What each command needs to parse at all, so that the well-formed lines reach the value checks.
REQUIRED = {"generate": ["-p", "x"], "export": ["--out", "o"], "validate": ["art"], "train": ["teacher", "--out", "o"]}


def _argv() -> st.SearchStrategy[list[str]]:
    per_command = st.sampled_from(sorted(FLAGS)).flatmap(
        lambda c: st.lists(st.one_of(st.sampled_from(FLAGS[c]), TOKENS), max_size=8).map(lambda rest: [c, *rest]))
    well_formed = st.sampled_from(sorted(FLAGS)).flatmap(
        lambda c: st.lists(st.tuples(st.sampled_from(FLAGS[c]), TOKENS), max_size=4).map(
            lambda pairs: [c, *REQUIRED.get(c, []), *(t for pair in pairs for t in pair)]))
    anything = st.lists(st.one_of(st.sampled_from(ALL_FLAGS + sorted(FLAGS)), TOKENS), max_size=6)
    return st.one_of(per_command, well_formed, anything)


def _sampling_fields(args: object) -> dict[str, object]:
    return {f.name: getattr(args, f.name) for f in fields(SampleConfig) if getattr(args, f.name, None) is not None}


@SLICE
@given(_argv())
def test_command_lines_parse_or_fail_as_usage_errors(argv):
    try:
        args = PARSER.parse_args(argv)
    except UsageError:
        OUTCOMES["argv", "usage error"] += 1
        return
    if args.command in ("generate", "eval"):
        SampleConfig(**_sampling_fields(args))  # what the parser let through, the Python API takes too
    out = getattr(args, "out", None) or getattr(args, "report", None)
    if out is not None and not out.is_absolute():
        _in_sandbox(lambda: _prepare(out))
    else:
        OUTCOMES["argv", "parsed"] += 1


def _prepare(path: Path) -> None:
    try:
        prepare_output_dir(path, "artifacts.json")
        OUTCOMES["argv", "parsed, output path accepted"] += 1
    except PocketdiffError:
        OUTCOMES["argv", "parsed, output path refused"] += 1


def _in_sandbox(fn) -> None:
    """Run `fn` with the sandbox as the current folder; its contents must be untouched."""
    _populate()
    before = sorted((str(p), p.is_dir()) for p in SANDBOX.rglob("*"))
    cwd = os.getcwd()
    os.chdir(SANDBOX / "work")
    try:
        fn()
    finally:
        os.chdir(cwd)
    assert sorted((str(p), p.is_dir()) for p in SANDBOX.rglob("*")) == before


def _populate() -> None:
    (SANDBOX / "work" / "earlier").mkdir(parents=True, exist_ok=True)
    (SANDBOX / "work" / "earlier" / "artifacts.json").write_text("{}")
    (SANDBOX / "work" / "photos").mkdir(exist_ok=True)
    (SANDBOX / "work" / "photos" / "a.jpg").write_text("x")
    (SANDBOX / "work" / "file").write_text("x")
    if not (SANDBOX / "work" / "link").is_symlink():
        (SANDBOX / "work" / "link").symlink_to(SANDBOX / "work" / "photos")


SEGMENTS = st.one_of(st.sampled_from([".", "..", "earlier", "photos", "file", "link", "new", " ", "é", "a" * 300]),
                     st.text(st.characters(blacklist_characters="/\x00"), min_size=1, max_size=8))


@SLICE
@given(st.lists(SEGMENTS, min_size=1, max_size=4), st.booleans())
def test_output_paths_are_accepted_or_refused_never_crash(segments, overwrite):
    def check() -> None:
        try:
            prepare_output_dir(Path(*segments), "artifacts.json", overwrite=overwrite)
            OUTCOMES["output path", "accepted"] += 1
        except PocketdiffError:
            OUTCOMES["output path", "pocketdiff error"] += 1
    _in_sandbox(check)


ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=6),
                      st.lists(st.integers(), max_size=2))


@SLICE
@given(st.dictionaries(st.sampled_from([f.name for f in fields(SampleConfig)]), ANY_VALUE))
def test_sample_configs_are_made_or_refused_as_config_errors(values):
    try:
        SampleConfig(**values)
        OUTCOMES["SampleConfig", "made"] += 1
    except PocketdiffError:
        OUTCOMES["SampleConfig", "pocketdiff error"] += 1


JSON_DATA = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4)),
                         lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                 st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                         max_leaves=12)


@SLICE
@given(JSON_DATA)
def test_json_results_are_always_strict_json(data):
    json.loads(json_text(data), parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(c)))
    OUTCOMES["json", "strict"] += 1


def _toml(value: object) -> str:
    """`value` as a TOML value (strings JSON-quoted, which TOML's basic strings accept)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


TOML_VALUE = st.recursive(st.one_of(st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.text(max_size=4), inner, max_size=2)),
                          max_leaves=6)


def _pass_table() -> st.SearchStrategy[dict[str, object]]:
    names = PASSES.names()
    keys = sorted({f.name for n in names for f in fields(type(get_pass(n)).Settings)} | {"name", "colour"})
    return st.dictionaries(st.sampled_from(keys), TOML_VALUE, max_size=4).flatmap(
        lambda t: st.one_of(st.just(t), st.sampled_from(names).map(lambda n: {**t, "name": n})))


RECIPE = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.sampled_from(["fashion", "arch:tiny"]), TOML_VALUE),
    "teacher": TOML_VALUE,
    "pass": st.one_of(st.lists(_pass_table(), max_size=3), TOML_VALUE),
    "sample": st.one_of(st.dictionaries(st.sampled_from([f.name for f in fields(SampleSettings)] + ["size"]),
                                        TOML_VALUE, max_size=4), TOML_VALUE),
    "extra": TOML_VALUE,
})


def _recipe_text(recipe: dict[str, object]) -> str:
    lines = [f"{k} = {_toml(v)}" for k, v in recipe.items() if k not in ("pass", "sample")
             or not (isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(t, dict) for t in v)))]
    if isinstance(recipe.get("sample"), dict):
        lines += ["[sample]"] + [f"{json.dumps(k)} = {_toml(v)}" for k, v in recipe["sample"].items()]
    if isinstance(recipe.get("pass"), list) and recipe["pass"] and all(isinstance(t, dict) for t in recipe["pass"]):
        for table in recipe["pass"]:
            lines += ["[[pass]]"] + [f"{json.dumps(k)} = {_toml(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _load(text: str) -> None:
    path = SANDBOX / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
        OUTCOMES["recipe", "loaded"] += 1
    except PocketdiffError:
        OUTCOMES["recipe", "pocketdiff error"] += 1


@SLICE
@given(RECIPE)
def test_recipes_from_random_tables_load_or_fail_as_pocketdiff_errors(recipe):
    _load(_recipe_text(recipe))


@SLICE
@given(st.one_of(st.text(max_size=60),
                 st.lists(st.sampled_from(['model = "fashion"', "[[pass]]", 'name = "cast"', 'name = "scheduler"',
                                           'kind = "lcm"', 'dtype = "float16"', "[sample]", "steps = 0", "seed = -1",
                                           'prompts = "abc"', "guidance_scale = nan", "pass = 3", "sample = 5",
                                           "components = []", "x = [", '"' * 3, "steps = 1e3"]),
                          max_size=8).map("\n".join)))
def test_recipes_from_random_text_load_or_fail_as_pocketdiff_errors(text):
    _load(text)

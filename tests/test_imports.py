"""Every module imports on its own, no project modules import each other in a circle, and DESIGN.md's import rules hold."""

import ast
import graphlib
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> folder, as pyproject maps them (pocketdiff/, and compress/, export/, runtimes/ into pocketdiff.*)
PACKAGE_DIRS = {name: ROOT / folder for name, folder in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].items()}
REWRITES = "pocketdiff.export.rewrites"

# One interpreter imports each module with every project module dropped from sys.modules first, so each
# import runs the project's code in the order a fresh interpreter would (an import circle fails there as
# it would for a user). Third-party modules stay loaded between imports: they never import the project, so
# keeping them changes no project import order, and it saves re-importing torch / diffusers / coremltools
# per module (one interpreter per module takes minutes on 2 cores). `__main__` modules run the CLI when
# imported, so they are not imported; `python -m pocketdiff` runs it through cli, which is.
_IMPORT_EACH = textwrap.dedent("""
    import importlib, json, pkgutil, sys, traceback
    packages = json.loads(sys.argv[1])
    names = set(packages)
    for package in packages:
        names.update(m.name for m in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."))
    failures = {}
    for name in sorted(n for n in names if n.rpartition(".")[2] != "__main__"):
        for loaded in [m for m in sys.modules if m == "pocketdiff" or m.startswith("pocketdiff.")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except BaseException:
            failures[name] = traceback.format_exc(limit=-4)
    print(json.dumps({"imported": sorted(names), "failures": failures}))
""")


def module_files(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """Module name -> source file for every .py under the mapped package folders (a package is its __init__)."""
    files = {}
    for package, folder in package_dirs.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph(package_dirs: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, read as text (ast): module-level and lazy imports alike,
    since a lazy import that closes a circle still is one (DESIGN.md: lazy imports never hide a circle)."""
    files = module_files(package_dirs)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                stem = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets = [stem, *(f"{stem}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                # importing a module imports its parent packages anyway: that is not an edge
                if target and target != mod and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (its modules in import order, the first repeated last), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return list(reversed(e.args[1]))
    return None


def _backend(module: str, backends: tuple[str, ...]) -> str | None:
    """The backend a module belongs to (export/<backend>.py or a module inside export/<backend>/)."""
    for name in backends:
        if module == f"pocketdiff.export.{name}" or module.startswith(f"pocketdiff.export.{name}."):
            return name
    return None


def rule_breaks(graph: dict[str, set[str]], backends: tuple[str, ...]) -> list[str]:
    """Every import that breaks DESIGN.md's import rules, as "importer -> imported: rule"."""
    breaks = []
    for mod, targets in sorted(graph.items()):
        for target in sorted(targets):
            if mod.startswith(REWRITES + ".") and _backend(target, backends):
                breaks.append(f"{mod} -> {target}: rewrites are leaves, they never import a backend")
            if _backend(mod, backends) and _backend(target, backends) not in (None, _backend(mod, backends)):
                breaks.append(f"{mod} -> {target}: backends never import each other")
            if mod.startswith("pocketdiff.compress") and target.startswith("pocketdiff.export"):
                breaks.append(f"{mod} -> {target}: compress never imports export")
            if mod.startswith("pocketdiff.runtimes") and (target == REWRITES or target.startswith(REWRITES + ".")):
                breaks.append(f"{mod} -> {target}: runtimes import export's base and backends' helpers, "
                              "never a rewrite")
    return breaks


def test_every_module_imports_on_its_own():
    run = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(sorted(PACKAGE_DIRS))], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    # the walk found the mapped packages' modules, not only pocketdiff/'s
    assert {"pocketdiff.cli", "pocketdiff.export.onnx", f"{REWRITES}.attention", "pocketdiff.runtimes.harness",
            "pocketdiff.compress"} <= set(result["imported"])
    assert not result["failures"], "\n".join(f"{m}:\n{tb}" for m, tb in result["failures"].items())


def test_no_import_circles_and_the_import_rules_hold():
    from pocketdiff.export.base import BUILTIN_BACKENDS

    graph = import_graph(PACKAGE_DIRS)
    # the reading resolves relative imports (else every check below would pass vacuously)
    assert f"{REWRITES}.attention" in graph["pocketdiff.export.onnx"]
    assert f"{REWRITES}.winograd_table" in graph[f"{REWRITES}.winograd"]
    found = circle(graph)
    assert found is None, "import circle: " + " -> ".join(found)
    breaks = rule_breaks(graph, BUILTIN_BACKENDS)
    assert not breaks, "\n".join(breaks)


@pytest.mark.parametrize("lazy", [False, True])
def test_a_planted_circle_and_a_rule_break_are_found(tmp_path, lazy):
    """The checks themselves: a backend importing another, lazily or not, is both a circle and a rule break."""
    export = tmp_path / "export"
    (export / "rewrites").mkdir(parents=True)
    (export / "__init__.py").write_text("")
    (export / "rewrites" / "__init__.py").write_text("")
    (export / "rewrites" / "norms.py").write_text("X = 1\n")
    (export / "onnx.py").write_text("from .rewrites.norms import X\nfrom .coreml import Y\n")
    body = "def f():\n    from . import onnx\n" if lazy else "from . import onnx\n"
    (export / "coreml.py").write_text(body + "Y = 2\n")
    graph = import_graph({"pocketdiff.export": export})
    assert graph["pocketdiff.export.onnx"] == {f"{REWRITES}.norms", "pocketdiff.export.coreml"}
    assert circle(graph) in (["pocketdiff.export.onnx", "pocketdiff.export.coreml", "pocketdiff.export.onnx"],
                             ["pocketdiff.export.coreml", "pocketdiff.export.onnx", "pocketdiff.export.coreml"])
    assert len(rule_breaks(graph, ("onnx", "coreml"))) == 2

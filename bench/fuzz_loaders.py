"""Fuzz the loaders of untrusted files at a large count: every input must end in success or a PocketdiffError.

Runs the property targets of tests/test_fuzz_loaders.py (safetensors header check, artifacts.json
reader, model-folder loader) with many more examples, then prints per target the inputs tried,
the outcomes by kind, the crashes (anything else: must be 0), seconds and the peak RSS.
Usage: python bench/fuzz_loaders.py [--safetensors 30000] [--manifests 20000] [--folders 1500] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, seed, settings

TESTS = Path(__file__).resolve().parents[1] / "tests" / "test_fuzz_loaders.py"


def load_targets() -> Any:
    """The strategies and property checks, from the test module (one definition for both)."""
    spec = importlib.util.spec_from_file_location("test_fuzz_loaders", TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fuzz(name: str, strategy: Any, check: Callable[[Any], str], count: int, run_seed: int) -> None:
    """Run `check` on `count` inputs drawn from `strategy`; print the tally."""
    tally: Counter[str] = Counter()
    crashes: list[str] = []

    @seed(run_seed)
    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(value=strategy)
    def run(value: Any) -> None:
        try:
            tally[check(value)] += 1
        except Exception as e:  # a crash: recorded, and the run goes on
            crashes.append(f"{type(e).__name__}: {str(e)[:120]}")
            tally["CRASH"] += 1

    t0 = time.monotonic()
    run()
    kinds = ", ".join(f"{k} {v}" for k, v in tally.most_common())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{name:<12} inputs {sum(tally.values()):>6}  crashes {len(crashes)}  ({kinds})  "
          f"{time.monotonic() - t0:.0f} s, peak RSS {rss:.0f} MB", flush=True)
    for c in sorted(set(crashes))[:10]:
        print(f"  crash: {c}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--safetensors", type=int, default=30_000)
    ap.add_argument("--manifests", type=int, default=20_000)
    ap.add_argument("--folders", type=int, default=1_500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t = load_targets()
    import diffusers
    import transformers

    from pocketdiff.zoo import build_arch

    diffusers.utils.logging.set_verbosity_error()  # each odd config key is otherwise one warning
    transformers.utils.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fuzz("safetensors", t.safetensors_bytes(), lambda b: t.check_safetensors_bytes(root, b), args.safetensors,
             args.seed)
        (root / "m").mkdir()
        fuzz("manifests", t.manifests(), lambda d: t.check_manifest(root / "m", d), args.manifests, args.seed)
        folder = root / "tiny"
        build_arch("tiny", seed=0).save(folder)
        originals = {f: (folder / f).read_bytes() for f in t.FOLDER_FILES}
        fuzz("folders", t.folder_edits(), lambda e: t.check_folder_edit(folder, originals, e), args.folders, args.seed)


if __name__ == "__main__":
    main()

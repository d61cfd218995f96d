"""Fuzz the CLI argument layer, sampling values, output paths, JSON results and the recipe parser at scale.

Runs the properties of tests/test_fuzz_cli.py (which runs a seeded slice of each) with many more random
inputs, and prints how many inputs each saw and how they ended. Any exception other than pocketdiff's own
errors (or argparse's usage error) fails the property and is printed with its smallest failing input.

    .venv/bin/python bench/fuzz.py            # >= 100,000 inputs in all
    .venv/bin/python bench/fuzz.py --scale 0.1
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
# Inputs per property at --scale 1 (105,000 in all).
BUDGET = {
    "test_command_lines_parse_or_fail_as_usage_errors": 40_000,
    "test_output_paths_are_accepted_or_refused_never_crash": 15_000,
    "test_sample_configs_are_made_or_refused_as_config_errors": 20_000,
    "test_json_results_are_always_strict_json": 10_000,
    "test_recipes_from_random_tables_load_or_fail_as_pocketdiff_errors": 10_000,
    "test_recipes_from_random_text_load_or_fail_as_pocketdiff_errors": 10_000,
}


def _properties(examples: int):
    """A fresh copy of the test module whose properties run `examples` random inputs each."""
    os.environ["POCKETDIFF_FUZZ_EXAMPLES"] = str(examples)
    spec = importlib.util.spec_from_file_location(f"fuzz_properties_{examples}", ROOT / "tests" / "test_fuzz_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    """Run every property with its budget; print inputs and outcomes; exit 1 if any property failed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every budget by this")
    args = ap.parse_args()
    failures, total = 0, 0
    print(f"{'property':<70}{'inputs':>9}{'seconds':>9}  outcomes")
    for name, budget in BUDGET.items():
        props = _properties(max(1, int(budget * args.scale)))
        t0 = time.monotonic()
        try:
            getattr(props, name)()
            status = ""
        except Exception as e:  # a crash: the property's smallest failing input is in the message
            failures += 1
            status = f"  FAILED: {type(e).__name__}: {str(e)[:500]}"
        inputs = sum(props.OUTCOMES.values())
        total += inputs
        outcomes = ", ".join(f"{how} {v:,}" for (_, how), v in sorted(props.OUTCOMES.items()))
        print(f"{name:<70}{inputs:>9,}{time.monotonic() - t0:>9.1f}  {outcomes}{status}", flush=True)
    print(f"total inputs {total:,}; properties failed {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Single-file round trip at real scale: an SD1.5-architecture pipeline (random weights) written as
an original-format .safetensors, read back with the zoo's SD1.5 configs (no --model-config), and
compared tensor by tensor. Prints seconds, file size and peak memory.
Usage: python bench/single_file_sd15.py [--dtype float16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from pocketdiff.single_file import load_single_file, save_single_file
from pocketdiff.zoo import build_arch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    bundle = build_arch("sd15", seed=0).to("cpu", dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd15.safetensors"
        t0 = time.monotonic()
        save_single_file(bundle, path)
        t1 = time.monotonic()
        loaded = load_single_file(path, dtype=dtype)
        t2 = time.monotonic()
        mismatched = {name: sum(not torch.equal(a, loaded.modules()[name].state_dict()[k])
                                for k, a in module.state_dict().items())
                      for name, module in bundle.modules().items()}
        result = {"arch": "sd15", "dtype": args.dtype, "file_bytes": path.stat().st_size,
                  "save_s": round(t1 - t0, 1), "load_s": round(t2 - t1, 1), "family": loaded.manifest.source["family"],
                  "tensors": {n: len(m.state_dict()) for n, m in bundle.modules().items()},
                  "mismatched_tensors": mismatched,
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Weight count of a U-Net before and after the Winograd rewrite the table selects (meta device, no weights).

F(m x m, 3 x 3) stores (m+2)^2 transformed values per 3x3 filter instead of 9, so a rewritten layer's
weights grow 16/9 (F2) or 36/9 (F4); this prints what that does to the exported file.

    .venv/bin/python bench/winograd_size.py arch:sd15 --resolution 512
"""

from __future__ import annotations

import argparse
import warnings

from pocketdiff.export.components import example_inputs, wrap
from pocketdiff.export.rewrites.winograd import choose_m, conv_input_sizes
from pocketdiff.export.rewrites.winograd_torch import eligible_module
from pocketdiff.sources import load_model


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--component", default="unet")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--mode", default="auto")
    args = p.parse_args()
    bundle = load_model(args.model, shapes_only=True)
    spec = wrap(bundle, args.component)
    feeds = {k: v.to("meta") for k, v in example_inputs(bundle, args.component, 1, args.resolution).items()}
    modules = dict(spec.module.named_modules())
    total = sum(p.numel() for p in spec.module.parameters())
    grown = 0.0
    rewritten = 0
    for path, (h, w) in conv_input_sizes(spec.module, feeds).items():
        conv = modules[path]
        if not eligible_module(conv):
            continue
        m = choose_m("onnx", conv.in_channels, conv.out_channels, h, w, args.mode)
        if m:
            rewritten += 1
            grown += conv.weight.numel() * ((m + 2) ** 2 / 9 - 1)
    after = total + grown
    print(f"{args.model} {args.component} ({args.mode}): {rewritten} convs rewritten; parameters "
          f"{total / 1e6:,.1f}M -> {after / 1e6:,.1f}M; fp32 {total * 4 / 1e9:.2f} GB -> {after * 4 / 1e9:.2f} GB")


if __name__ == "__main__":
    main()

"""How much folding a guidance scale into a student's U-Net changes its images: the unfolded student
sampled at guidance G against the folded one (no guidance input), same prompts and seeds, CPU fp32.
Usage: python bench/fold_fidelity.py UNFOLDED_DIR FOLDED_DIR --guidance G
"""

from __future__ import annotations

import argparse

from pocketdiff.bundle import Bundle
from pocketdiff.sampler import SampleConfig, generate
from pocketdiff.zoo import load_minilm, load_tokenizer

PROMPTS = ["a photo of a sneaker", "a photo of a dress", "ankle boot, product shot", "a photo of a bag"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("unfolded")
    ap.add_argument("folded")
    ap.add_argument("--guidance", type=float, required=True)
    args = ap.parse_args()
    unfolded, folded = Bundle.load(args.unfolded), Bundle.load(args.folded)
    for b in (unfolded, folded):  # run folders of the built-in model carry no text encoder
        if b.text_encoder is None:
            b.text_encoder, b.tokenizer = load_minilm(), load_tokenizer()
    a = generate(unfolded, PROMPTS, SampleConfig.for_bundle(unfolded, guidance_scale=args.guidance), progress=False)
    b = generate(folded, PROMPTS, SampleConfig.for_bundle(folded), progress=False)
    diff = (a - b).abs()
    print(f"{len(PROMPTS)} images: max abs difference {float(diff.max()):.2e}, mean {float(diff.mean()):.2e} "
          f"(images in [0, 1]; an 8-bit level is {1 / 255:.2e})")


if __name__ == "__main__":
    main()

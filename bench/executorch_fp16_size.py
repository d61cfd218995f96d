"""Why ExecuTorch fp16 programs of conv-heavy components are not half their fp32 size.

Lowers one 3x3 convolution and one linear layer to XNNPACK in fp32 and fp16 and prints the weight
bytes against the .pte bytes. ExecuTorch's XNNPACK serializer stores convolution filters and biases
as fp32 even in fp16 graphs (`force_fp32=True` in backends/xnnpack/operators/op_conv2d.py; XNNPACK
converts them when the program loads), while linear weights keep fp16.

    .venv/bin/python bench/executorch_fp16_size.py
"""

from __future__ import annotations

import warnings

import torch
from executorch.exir import to_edge_transform_and_lower
from torch import nn

from pocketdiff.export.executorch import xnnpack_partitioners

LAYERS = {"conv 128->128 3x3": (lambda: nn.Conv2d(128, 128, 3, padding=1), (1, 128, 16, 16)),
          "linear 512->512": (lambda: nn.Linear(512, 512), (1, 8, 512))}


def main() -> None:
    warnings.filterwarnings("ignore")
    print(f"{'layer':20s} {'dtype':8s} {'weight bytes':>12s} {'pte bytes':>10s}")
    for name, (make, shape) in LAYERS.items():
        for dtype in (torch.float32, torch.float16):
            torch.manual_seed(0)
            layer = make().to(dtype).eval()
            ep = torch.export.export(layer, (torch.randn(*shape).to(dtype),))
            pte = to_edge_transform_and_lower(ep, partitioner=xnnpack_partitioners()).to_executorch().buffer
            weights = sum(p.numel() * p.element_size() for p in layer.parameters())
            print(f"{name:20s} {str(dtype).split('.')[1]:8s} {weights:12,d} {len(pte):10,d}")


if __name__ == "__main__":
    main()

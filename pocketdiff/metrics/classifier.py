"""Prompt accuracy: a Fashion-MNIST classifier trained by pocketdiff judges generated images.

The classifier sees 28x28 grey images; generated 64x64 RGB images are averaged over channels and
area-resized to 28x28 first. Prompt accuracy is the share of images whose predicted class is the
class named in their prompt.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..data import load_fashion_mnist, to_model_images
from ..errors import DataError
from ..training import LoopSpec, OptimizerSpec, StepContext, Trainer

WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "classifier.safetensors"


class FashionClassifier(nn.Module):
    """A small VGG-style CNN (about 0.4M parameters) for 28x28 grey images in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, 32), block(32, 64), block(64, 128))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 3 * 3, 256), nn.ReLU(),
                                  nn.Dropout(0.3), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1))


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] (any size, 1 or 3 channels) -> [N, 1, 28, 28]."""
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-1] != 28:
        x = F.interpolate(x, size=(28, 28), mode="area")
    return x


def load_classifier(path: Path | None = None, device: str | torch.device = "cpu") -> FashionClassifier:
    """The shipped classifier (or one at `path`)."""
    path = path or WEIGHTS
    if not path.is_file():
        raise DataError(f"{path}: classifier weights not found; train them with `pocketdiff train classifier`")
    model = FashionClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


@torch.no_grad()
def predict(model: FashionClassifier, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Predicted class of each image [N, C, H, W] in [0, 1]."""
    device = next(model.parameters()).device
    return torch.cat([model(to_classifier_input(images[i:i + batch]).to(device)).argmax(1).cpu()
                      for i in range(0, len(images), batch)])


def prompt_accuracy(model: FashionClassifier, images: torch.Tensor, labels: list[int] | torch.Tensor) -> float:
    """Share of images classified as the class their prompt named."""
    return float((predict(model, images) == torch.as_tensor(labels)).float().mean())


def _as_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(images, dtype=np.float32) / 255.0).unsqueeze(1)


def round_trip(images: np.ndarray) -> torch.Tensor:
    """Real 28x28 images as the classifier sees generated ones: through the 64x64 model space and back."""
    return to_classifier_input((to_model_images(images) + 1) / 2)


def train_classifier(out: Path, data_root: Path | None = None, seed: int = 0, device: str | None = None,
                     epochs: int = 8, batch: int = 128, progress: bool = True) -> dict:
    """Train on real and round-tripped images (see `round_trip`) with random shifts; save safetensors;
    report test accuracy on both forms."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    xtr, ytr = load_fashion_mnist("train", data_root)
    xte, yte = load_fashion_mnist("test", data_root)
    x = torch.cat([_as_unit(xtr), round_trip(xtr)]).to(dev)
    y = torch.as_tensor(ytr).repeat(2).to(dev)
    model = FashionClassifier().to(dev)
    steps = epochs * (len(x) // batch)
    out = Path(out)
    work = out.parent / f".{out.name}.train"
    spec = LoopSpec("classifier", steps, work, seed, checkpoint_every=max(1, steps // 4), log_every=200,
                    batch_size=batch)
    trainer = Trainer(spec, {"classifier": model},
                      [OptimizerSpec("classifier", ["classifier"], lr=2e-3, warmup=steps // 10, weight_decay=5e-4,
                                     grad_clip=None, final_lr_fraction=0.01)], progress=progress)
    t0 = time.monotonic()

    def step(ctx: StepContext) -> torch.Tensor:
        idx = torch.randint(len(x), (batch,), generator=ctx.generator, device=dev)
        shift = torch.randint(-2, 3, (2,), generator=ctx.generator, device=dev).tolist()
        xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))
        return F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)

    trainer.fit(step)
    shutil.rmtree(work, ignore_errors=True)
    acc = prompt_accuracy(model, _as_unit(xte).to(dev), torch.as_tensor(yte))
    acc_rt = prompt_accuracy(model, round_trip(xte).to(dev), torch.as_tensor(yte))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out))
    return {"test_accuracy": acc, "test_accuracy_round_trip": acc_rt, "epochs": epochs, "seconds": round(time.monotonic() - t0, 1),
            "device": str(dev), "params": sum(p.numel() for p in model.parameters())}

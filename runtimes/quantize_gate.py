"""The gate a quantized export passes before its folder is written: validation at the scheme's figures
(end-to-end PSNR against the float model's images, per-component parity, the first diverging layer
named on failure) plus prompt accuracy on a fixed class-prompt set against the float model's.

Prompt accuracy is judged only where the classifier judges the float model itself (its accuracy at
least `MIN_FLOAT_ACCURACY`): for any other model the check is reported as not applicable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bundle import Bundle
from ..data import class_prompts
from ..errors import GateError
from ..export.base import ArtifactSet
from ..metrics.classifier import WEIGHTS, load_classifier, prompt_accuracy
from ..sampler import SampleConfig, TorchComponents, generate
from .base import open_session
from .harness import FALLBACK, FAILED, ArtifactComponents, ValidateConfig, failure_message, validate

ACCURACY_PROMPTS_PER_CLASS = 1
MIN_FLOAT_ACCURACY = 0.5


def accuracy_check(folder: Path, aset: ArtifactSet, bundle: Bundle, target: str, config: ValidateConfig,
                   drop: float) -> dict[str, Any]:
    """Prompt accuracy of the float model and of `target`'s artifacts on the class prompts; status
    "failed" when the artifacts fall more than `drop` below the float model."""
    if not WEIGHTS.is_file():
        return {"status": "not applicable", "note": "no classifier weights installed"}
    prompts, labels = class_prompts(ACCURACY_PROMPTS_PER_CLASS)
    cfg = SampleConfig.for_bundle(bundle, fallback=FALLBACK, steps=config.steps, scheduler=config.scheduler,
                                  guidance_scale=config.guidance_scale, seed=config.seed,
                                  height=config.resolution, width=config.resolution)
    classifier = load_classifier()
    base = prompt_accuracy(classifier, generate(bundle, prompts, cfg, TorchComponents(bundle), progress=False), labels)
    result: dict[str, Any] = {"prompts": len(prompts), "float": base, "max_drop": drop}
    if base < MIN_FLOAT_ACCURACY:
        return {**result, "status": "not applicable",
                "note": f"the classifier does not judge this model (float accuracy below {MIN_FLOAT_ACCURACY})"}
    sessions = {a.component: open_session(a, folder) for a in aset.artifacts
                if a.target == target and a.component != "vae_encoder"}
    images = generate(bundle, prompts, cfg, ArtifactComponents(bundle, sessions), progress=False)
    result["quantized"] = ours = prompt_accuracy(classifier, images, labels)
    return {**result, "status": FAILED if ours < base - drop else "passed"}


class QuantizationGate:
    """`export_bundle`'s check for a quantized export; keeps the last report (`report`) for the command."""

    def __init__(self, bundle: Bundle, config: ValidateConfig | None = None):
        self.bundle, self.config = bundle, config or ValidateConfig()
        self.report: dict[str, Any] = {}

    def __call__(self, folder: Path, aset: ArtifactSet) -> None:
        """GateError with the figures (and the first diverging layer) when any target misses a gate."""
        report = validate(folder, bundle=self.bundle, config=self.config)
        gates = (aset.quantization or {}).get("gates", {})
        accuracy_failures = []
        for t in report["targets"]:
            t["prompt_accuracy"] = acc = accuracy_check(folder, aset, self.bundle, t["target"], self.config,
                                                        gates.get("accuracy_drop", 0.0))
            if acc["status"] == FAILED:
                accuracy_failures.append(f"{t['target']}: prompt accuracy {acc['quantized']:.2f} vs float "
                                         f"{acc['float']:.2f} (may fall at most {acc['max_drop']})")
        report["passed"] = report["passed"] and not accuracy_failures
        self.report = report
        if not report["passed"]:
            figures = " | ".join(filter(None, [failure_message(report)] + accuracy_failures))
            raise GateError(f"quantized artifacts ({aset.quantization['scheme']}) refused, nothing written: {figures}")

"""Quantize steps: the registry of each backend's step, and what `export_bundle` calls between export and save.

A backend's quantize step lives beside its exporter (`export/<target>_quantize.py`) and registers
under the same target name with the kinds of `compress.quantize.spec` it can run, each mapped to
the function that does it, so asking for a scheme is a lookup, never a chain of ifs. A target with
no registered step (Core ML for now) cannot run any scheme.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ..bundle import Bundle
from ..compress.quantize.calibration import CalibrationSet
from ..compress.quantize.spec import QuantSpec
from ..errors import ConfigError
from ..registry import Registry
from .base import Artifact, ArtifactSet, ExportOptions, load_builtins

# One kind's step: (bundle, artifact, spec, calibration, artifact folder) -> details to record.
KindStep = Callable[[Bundle, Artifact, QuantSpec, "CalibrationSet | None", Path], dict[str, Any]]


class QuantizeStep(Protocol):
    """Quantizes one backend's exported artifacts in place, by kind."""

    target: ClassVar[str]
    kinds: ClassVar[dict[str, KindStep]]


QUANTIZE_STEPS: Registry[QuantizeStep] = Registry(
    "target", ConfigError, lambda name: f"export target {name!r} has no quantize step yet, so it cannot run a "
                                        "quantization scheme; targets that have one", load=load_builtins)
register_quantize_step = QUANTIZE_STEPS.register


@dataclass
class Quantization:
    """What to quantize (the spec) and, when a kind needs it, the calibration set."""

    spec: QuantSpec
    calibration: CalibrationSet | None = None


def check_quantization(targets: list[str], spec: QuantSpec, options: ExportOptions) -> ExportOptions:
    """The export options a quantized export runs with; ConfigError, before any work, for a target whose
    step lacks a kind the scheme needs, a non-fp32 precision or a forced Winograd rewrite."""
    for target in targets:
        step = QUANTIZE_STEPS.create(target)
        for component, kind in spec.kinds.items():
            if kind != "float" and kind not in step.kinds:
                raise ConfigError(f"{target} cannot run quantization scheme {spec.scheme!r}: its quantize step has no "
                                  f"{kind} (wanted for the {component}); it runs {', '.join(step.kinds)}")
    if options.precision != "fp32":
        raise ConfigError(f"--quantize starts from the fp32 graphs; drop --precision {options.precision}")
    winograd = options.extra.get("winograd", "auto")
    if winograd not in ("auto", "off"):
        raise ConfigError(f"--winograd {winograd} cannot be combined with --quantize (int8 kernels quantize the "
                          "direct convolution's weights); leave --winograd at auto or off")
    return replace(options, extra={**options.extra, "winograd": "off"})


class QuantizeExport:
    """The `ExportStep` of a quantized export: each artifact through its backend's step, then `gate`."""

    def __init__(self, bundle: Bundle, quantization: Quantization,
                 gate: Callable[[Path, ArtifactSet], None] | None = None):
        self.bundle, self.quantization, self.gate = bundle, quantization, gate
        spec = quantization.spec
        if quantization.calibration is not None:
            spec = replace(spec, calibration=quantization.calibration.record())
        self.manifest_entry = spec.to_json()

    def finish(self, artifact: Artifact, folder: Path) -> Artifact:
        """The artifact quantized in place as the spec says for its component."""
        return quantize_artifact(self.bundle, artifact, self.quantization, folder)

    def check(self, folder: Path, aset: ArtifactSet) -> None:
        """The gate (GateError refuses the folder)."""
        if self.gate:
            self.gate(folder, aset)


def quantize_artifact(bundle: Bundle, artifact: Artifact, quantization: Quantization, out: Path) -> Artifact:
    """Run the artifact's backend step for its component's kind; records the kind and figures in its details."""
    kind = quantization.spec.kinds.get(artifact.component, "float")
    if kind == "float":
        return artifact
    step = QUANTIZE_STEPS.create(artifact.target)
    details = step.kinds[kind](bundle, artifact, quantization.spec, quantization.calibration, out)
    artifact.details.update(details)
    artifact.details["quantization"] = {"scheme": quantization.spec.scheme, "kind": kind,
                                        **artifact.details.get("quantization", {})}
    return artifact

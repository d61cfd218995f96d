"""Core ML adapter: `MLModel.predict` on macOS; on Linux a static check only (Core ML cannot run here).

The static check reads the package's spec and verifies what can be verified without running it:
the program loads, its inputs/outputs carry the Core ML names and the enumerated shapes the
manifest promises, its op set holds the fused attention ops that were intended and no op outside
MIL's registry, and weights stored compressed (palettized / int8) decompress to the uncompressed
reference within tolerance. Such a session reports "static check only", never "passed".
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptFileError, GateError, InputPathError, ShapeError
from ..export.base import Artifact
from .base import register_runtime

COMPRESSED_OPS = ("constexpr_lut_to_dense", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale",
                  "constexpr_sparse_to_dense")

_COMPRESSED_SUFFIXES = ("_quantized", "_palettized", "_sparsified")  # what coremltools appends to compressed consts


def load_spec(path: Path) -> Any:
    """The package's protobuf spec; InputPathError if missing, CorruptFileError if unreadable."""
    import coremltools as ct

    if not path.exists():
        raise InputPathError(f"{path}: the artifact is missing; re-export with `pocketdiff export`")
    try:
        return ct.utils.load_spec(str(path))
    except Exception as e:  # coremltools raises assorted errors (protobuf, OS, key) for damaged packages
        raise CorruptFileError(f"{path}: Core ML cannot read the package ({str(e).strip()[:200]}); re-export it") from e


def io_shapes(spec: Any) -> dict[str, list[list[int]]]:
    """Core ML input name -> every shape it accepts (its enumerated shapes, or its one fixed shape)."""
    out = {}
    for inp in spec.description.input:
        arr = inp.type.multiArrayType
        enum = [list(s.shape) for s in arr.enumeratedShapes.shapes]
        out[inp.name] = enum or [list(arr.shape)]
    return out


def static_check(artifact: Artifact, path: Path, reference: Path | None = None, tolerance: float = 1e-2) -> dict[str, Any]:
    """Everything checkable without running the program; raises GateError on the first mismatch."""
    from ..export.coreml import op_counts, to_apple

    spec = load_spec(path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise GateError(f"{path}: not an ML Program (mlprogram) package")
    io = artifact.details.get("coreml_io", {})
    shapes = io_shapes(spec)
    outputs = [o.name for o in spec.description.output]
    for name in artifact.outputs:
        want = io.get(name, {}).get("name", name)
        if want not in outputs:
            raise GateError(f"{path}: output {want!r} missing (has {outputs})")
    import torch

    for exported in artifact.shapes:
        for name, shape in exported.items():
            cm = io.get(name, {"name": name, "layout": "same"})
            apple = list(to_apple(name, torch.zeros(shape), cm["layout"]).shape)
            if cm["name"] not in shapes:
                raise GateError(f"{path}: input {cm['name']!r} missing (has {sorted(shapes)})")
            if apple not in shapes[cm["name"]]:
                raise GateError(f"{path}: input {cm['name']!r} does not accept shape {apple} "
                                f"(accepts {shapes[cm['name']]})")
    ops = op_counts(path)
    fused = ops.get("scaled_dot_product_attention", 0)
    intended = artifact.details.get("fused_attention_intended", 0)
    if fused != intended:
        raise GateError(f"{path}: {fused} scaled_dot_product_attention ops, {intended} intended")
    report = {"ops": ops, "fused_attention": fused, "inputs": shapes, "outputs": outputs,
              "compressed_ops": {k: v for k, v in ops.items() if k in COMPRESSED_OPS}}
    if report["compressed_ops"] and reference is not None:
        report["weights"] = compare_weights(path, reference, tolerance)
    return report


def const_weights(path: Path, decompress: bool) -> dict[str, np.ndarray]:
    """Name -> value of every weight-sized const of the program (decompressing constexpr ops if asked)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.optimize.coreml import decompress_weights

    model = ct.models.MLModel(str(path), skip_model_load=True)
    if decompress:
        model = decompress_weights(model)
    prog = milproto_load(model.get_spec(), specification_version=model.get_spec().specificationVersion,
                         file_weights_dir=model.weights_dir)
    out = {}
    for fn in prog.functions.values():
        for op in fn.operations:
            if op.op_type == "const" and op.outputs[0].val is not None and np.size(op.outputs[0].val) >= 256:
                name = op.outputs[0].name
                for suffix in _COMPRESSED_SUFFIXES:
                    name = name.removesuffix(suffix)
                out[name] = np.asarray(op.outputs[0].val, dtype=np.float32)
    return out


def compare_weights(path: Path, reference: Path, tolerance: float) -> dict[str, Any]:
    """Worst relative L2 between each decompressed weight and the same-named weight of an uncompressed package."""
    got, ref = const_weights(path, decompress=True), const_weights(reference, decompress=False)
    common = [k for k in got if k in ref and got[k].shape == ref[k].shape]
    if not common:
        raise GateError(f"{path}: no weight matches the reference package {reference} by name and shape")
    errs = {k: float(np.linalg.norm(got[k] - ref[k]) / max(np.linalg.norm(ref[k]), 1e-12)) for k in common}
    worst = max(errs, key=errs.get)
    if errs[worst] > tolerance:
        raise GateError(f"{path}: weight {worst} decompresses to rel L2 {errs[worst]:.3g} from the reference "
                        f"(tolerance {tolerance})")
    return {"weights_compared": len(common), "worst": worst, "worst_rel_l2": errs[worst]}


class CoremlSession:
    """A Core ML package: runs on macOS, checked statically elsewhere."""

    def __init__(self, artifact: Artifact, folder: Path):
        self.artifact, self.path = artifact, Path(folder) / artifact.path
        self.static_only = platform.system() != "Darwin"
        ref = artifact.details.get("uncompressed_reference")  # set by a compression pass that keeps one
        self.checks = static_check(artifact, self.path, reference=Path(folder) / ref if ref else None)
        self.model: Any = None
        if not self.static_only:
            import coremltools as ct

            self.model = ct.models.MLModel(str(self.path))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.model is None:
            raise ShapeError(f"{self.path}: Core ML programs run only on macOS; here it is a static check only")
        import torch

        from ..export.coreml import to_apple

        io = self.artifact.details.get("coreml_io", {})
        cm_feeds = {}
        for name in self.artifact.inputs:
            if name not in feeds:
                raise ShapeError(f"{self.artifact.component}: input {name!r} is missing")
            cm = io.get(name, {"name": name, "layout": "same"})
            cm_feeds[cm["name"]] = to_apple(name, torch.from_numpy(np.asarray(feeds[name])), cm["layout"]).numpy()
        try:
            result = self.model.predict(cm_feeds)
        except Exception as e:
            raise ShapeError(f"{self.artifact.component}: Core ML rejected the inputs ({str(e)[:200]})") from e
        return {name: np.asarray(result[io.get(name, {}).get("name", name)], dtype=np.float32)
                for name in self.artifact.outputs}


@register_runtime
class CoremlRuntime:
    """Adapter for target "coreml"."""

    target = "coreml"

    def open(self, artifact: Artifact, folder: Path) -> CoremlSession:
        return CoremlSession(artifact, folder)

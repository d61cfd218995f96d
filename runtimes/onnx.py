"""onnxruntime adapter: runs ONNX artifacts on the CPU provider, checks feeds against what was exported.

Also finds, when a parity gate is missed, the first layer whose output diverges from PyTorch: ONNX
node names carry the module path they were traced from (/unet/down_blocks.0/resnets.0/conv1/Conv),
so every leaf layer's output can be exposed as a graph output and compared with a forward hook.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..errors import CorruptFileError, InputPathError, ShapeError
from ..export.base import Artifact
from ..export.onnx import node_scope, scope_index
from .base import register_runtime

WINOGRAD_NODE = re.compile(r"/Conv/winograd\d/.*$")
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def _ort() -> Any:
    import onnxruntime as ort

    return ort


def session_options(threads: int | None = None, optimization: str = "all") -> Any:
    """CPU session options; `optimization` is "all" (onnxruntime's default) or "basic"."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                     "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[optimization]
    return opts


def load_session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session; CorruptFileError for a file onnxruntime cannot read."""
    ort = _ort()
    if not path.is_file():
        raise InputPathError(f"{path}: the artifact file is missing; re-export with `pocketdiff export`")
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped pybind errors for bad files
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CorruptFileError(f"{path}: onnxruntime cannot load it ({first}); re-export it") from e


class OnnxSession:
    """One ONNX artifact loaded in onnxruntime."""

    static_only = False

    def __init__(self, artifact: Artifact, folder: Path, threads: int | None = None):
        self.artifact, self.path = artifact, Path(folder) / artifact.path
        self.session = load_session(self.path, threads)
        self.multiple = int(artifact.details.get("resolution_multiple", 1))
        self.vae_scale = int(artifact.details.get("vae_scale_factor", 1))

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """ShapeError for a missing input or a shape outside what the artifact was exported for."""
        for name, desc in self.artifact.inputs.items():
            if name not in feeds:
                raise ShapeError(f"{self.artifact.component}: input {name!r} is missing "
                                 f"(the artifact takes {', '.join(self.artifact.inputs)})")
            shape, want = tuple(feeds[name].shape), desc["shape"]
            if len(shape) != len(want):
                raise ShapeError(f"{self.artifact.component}: input {name!r} has shape {list(shape)}, "
                                 f"the artifact takes {want}")
            for got, dim in zip(shape, want):
                if isinstance(dim, int) and dim > 0 and got != dim:
                    raise ShapeError(f"{self.artifact.component}: input {name!r} has shape {list(shape)}, "
                                     f"the artifact was exported for {want}")
                if dim in ("height", "width"):
                    step = self.multiple if name == "sample" and self.artifact.component == "vae_encoder" \
                        else self.multiple // self.vae_scale
                    if got <= 0 or got % step:
                        raise ShapeError(f"{self.artifact.component}: input {name!r} {dim} {got} is not a multiple "
                                         f"of {step}, which the exported graph needs")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        try:
            outs = self.session.run(None, graph_feeds(self.artifact, feeds))
        except Exception as e:
            first = str(e).strip().splitlines()[0][:300]
            raise ShapeError(f"{self.artifact.component}: onnxruntime rejected the inputs ({first})") from e
        rescale = self.artifact.details.get("interface", {}).get("latent_rescale", 1.0)
        if self.artifact.component == "vae_encoder":
            outs = [o / np.asarray(rescale, o.dtype) for o in outs]
        return dict(zip([o.name for o in self.session.get_outputs()], outs))


def graph_feeds(artifact: Artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's own inputs from a component's standard feeds: its names and dtypes, and a decoder's latents
    in the diffusers ONNX convention (times `latent_rescale`, see `export.onnx_pipeline`)."""
    rescale = artifact.details.get("interface", {}).get("latent_rescale", 1.0)
    scale = rescale if artifact.component == "vae_decoder" else 1.0
    return {n: np.ascontiguousarray(feeds[n] * scale if n == "latent_sample" else feeds[n],
                                    dtype=_NP.get(d["dtype"], np.float32)) for n, d in artifact.inputs.items()}


@register_runtime
class OnnxRuntime:
    """Adapter for target "onnx"."""

    target = "onnx"

    def open(self, artifact: Artifact, folder: Path) -> OnnxSession:
        return OnnxSession(artifact, folder)


@torch.no_grad()
def first_diverging_layer(artifact: Artifact, folder: Path, module: torch.nn.Module,
                          feeds: dict[str, torch.Tensor], tolerance: float) -> dict[str, Any] | None:
    """The first leaf layer (graph order) whose ONNX output differs from PyTorch's by > tolerance (rel L2)."""
    model = onnx.load(str(Path(folder) / artifact.path))
    leaves = {p: m for p, m in module.named_modules() if not list(m.children()) and p}
    scopes = scope_index(leaves)
    last_node: dict[str, onnx.NodeProto] = {}
    order: list[str] = []
    for node in model.graph.node:
        # a Winograd-rewritten conv is still its module; scopes may lack the wrapper's prefix
        scope = scopes.get(node_scope(WINOGRAD_NODE.sub("/Conv", node.name)), "")
        if scope in leaves and node.op_type not in ("Constant", "Shape", "Cast"):
            if scope not in last_node:
                order.append(scope)
            last_node[scope] = node
    have = {o.name for o in model.graph.output}
    for scope in order:
        name = last_node[scope].output[0]
        if name not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    position = {id(n): i for i, n in enumerate(model.graph.node)}
    order.sort(key=lambda s: position[id(last_node[s])])
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [leaves[s].register_forward_hook(lambda m, a, o, s=s: _keep(captured, s, o)) for s in order]
    try:
        module(**feeds)
    finally:
        for h in hooks:
            h.remove()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=1024)
        sess = load_session(path)
        np_feeds = graph_feeds(artifact, {k: v.numpy() for k, v in feeds.items()})
        names = [o.name for o in sess.get_outputs()]
        values = dict(zip(names, sess.run(None, np_feeds)))
    for scope in order:
        calls, got = captured.get(scope, []), values.get(last_node[scope].output[0])
        if len(calls) != 1 or got is None or tuple(calls[0].shape) != tuple(got.shape):
            continue  # modules called more than once (a shared SiLU) cannot be matched to one node
        ref = calls[0]
        r, g = ref.double().flatten(), torch.from_numpy(got.astype(np.float64)).flatten()
        rel = float((r - g).norm() / r.norm().clamp_min(1e-30))
        if not np.isfinite(rel) or rel > tolerance:
            return {"layer": scope, "onnx_node": last_node[scope].name, "op": last_node[scope].op_type,
                    "rel_l2": rel, "tolerance": tolerance}
    return None


def _keep(store: dict[str, list[torch.Tensor]], scope: str, output: Any) -> None:
    """Forward hook body: keep each tensor output of a leaf module (returns None so the output is unchanged)."""
    if isinstance(output, torch.Tensor):
        store.setdefault(scope, []).append(output.detach().float())

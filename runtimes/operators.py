"""Per-operator time of one artifact call, from each runtime's own profiler.

onnxruntime: a session with `enable_profiling` writes a Chrome-trace JSON; every node's
`*_kernel_time` event is summed by operator type. ExecuTorch: a program loaded with ETDump on
records every operator, and inside the XNNPACK delegate every XNNPACK operator, read back through
`executorch.devtools.Inspector`; the delegate's own overhead is what its DELEGATE_CALL events hold
beyond its operators. Both run one untimed call first and report milliseconds per call.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..export.base import Artifact

TOP = 12  # operators listed per component; the rest are summed as "other"


def _table(totals: dict[str, float], calls: int, total_ms: float, source: str) -> dict[str, Any]:
    """The top operators by time per call, the rest summed, and the call's total."""
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    rows = [{"op": op, "ms": t / calls, "share": t / calls / total_ms if total_ms else 0.0} for op, t in ranked[:TOP]]
    rest = sum(t for _, t in ranked[TOP:]) / calls
    if rest:
        rows.append({"op": "other", "ms": rest, "share": rest / total_ms if total_ms else 0.0})
    return {"source": source, "calls": calls, "call_ms": total_ms, "ops": rows}


def onnx_operators(artifact: Artifact, folder: Path, feeds: dict[str, np.ndarray], calls: int = 3) -> dict[str, Any]:
    """onnxruntime's own per-node profile of `calls` calls, summed by operator type."""
    import onnxruntime as ort

    from .onnx import OnnxSession, session_options

    session = OnnxSession(artifact, folder)
    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options()
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "ort")
        session.session = ort.InferenceSession(str(session.path), opts, providers=["CPUExecutionProvider"])
        for _ in range(calls + 1):
            session.run(feeds)
        events = json.loads(Path(session.session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    start = runs[1]["ts"]  # the first call is untimed
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            totals[e["args"]["op_name"]] += e["dur"] / 1000
    total = sum(e["dur"] for e in runs[1:]) / 1000 / calls
    return _table(totals, calls, total, f"onnxruntime {ort.__version__} profiling (enable_profiling)")


def executorch_operators(artifact: Artifact, folder: Path, feeds: dict[str, np.ndarray],
                         calls: int = 3) -> dict[str, Any]:
    """ExecuTorch's ETDump of `calls` calls through the devtools Inspector, summed by operator."""
    import executorch
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    from .executorch import ExecutorchSession

    session = ExecutorchSession(artifact, folder)
    session.program = Runtime.get().load_program(session.path, enable_etdump=True, debug_buffer_size=0)
    _, chunk = session.plan(feeds)
    skip = np.shape(feeds[session.input_order[0]])[0] // chunk  # method calls per session call
    for _ in range(calls + 1):
        session.run(feeds)
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "run.etdp"
        session.program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        inspector = Inspector(etdump_path=str(etdump))
    totals: dict[str, float] = defaultdict(float)
    delegate_calls = delegated = execute = 0.0
    for block in inspector.event_blocks:
        for event in block.events:
            if not event.perf_data:
                continue
            timed = sum(event.perf_data.raw[skip:])  # one entry per method call; the first session call is untimed
            name = re.sub(r" #\d+$", "", event.name)
            if name == "Method::execute":
                execute += timed
            elif name == "DELEGATE_CALL":
                delegate_calls += timed
            elif event.is_delegated_op:
                totals[f"xnnpack: {name}"] += timed
                delegated += timed
            elif name.startswith("native_call_"):
                totals[name.removeprefix("native_call_").removesuffix(".out")] += timed
    totals["delegate overhead (DELEGATE_CALL beyond its operators)"] = max(0.0, delegate_calls - delegated)
    version = getattr(executorch, "__version__", "?")
    return _table(totals, calls, execute / calls, f"ExecuTorch {version} ETDump via executorch.devtools.Inspector")


OPERATOR_PROFILERS = {"onnx": onnx_operators, "executorch": executorch_operators}

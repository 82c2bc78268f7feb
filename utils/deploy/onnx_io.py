"""The ONNX conventions every exported file follows (opset, input/output names) and the onnxruntime session
every tool opens them with. A leaf of utils.deploy: export, runtime, engine and int8 build on it."""
from __future__ import annotations

from typing import Any

ONNX_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def onnx_session(path: str, threads: int = 0, spinning: bool = True,
                 providers: list[str | tuple[str, dict[str, Any]]] | None = None):
    """An onnxruntime session with every graph optimisation (``threads=0``: onnxruntime's default count).

    ``spinning=False`` stops idle worker threads from busy-waiting after each run: image decoding in
    DataLoader workers, or another runtime being timed, shares the same cores (measured: ~1.4x fewer
    images/s with spinning on a 2-core box).
    """
    import onnxruntime as ort  # noqa: PLC0415  (lazy: optional/heavy dependency)

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: optimiser notices are not the user's business
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, sess_options=opts, providers=providers or ["CPUExecutionProvider"])

"""An ONNX Runtime session as memscan opens one, for the onnx engine and for scan plans (no torch here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def open_session(path: str | Path, providers: list, threads: int | None = None) -> Any:
    """An `onnxruntime.InferenceSession` of the graph at `path`, all graph optimizations on, idle threads asleep;
    `threads` intra-op threads (default: ONNX Runtime's, one per physical core)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads spin by default, holding cores that other work (tokenizing, the
    # scan's other threads, another session) needs between calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=providers)

"""Where memscan keeps derived artefacts (exported ONNX graphs, TensorRT engines)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$MEMSCAN_CACHE`, else `$XDG_CACHE_HOME/memscan`, else `~/.cache/memscan`."""
    if "MEMSCAN_CACHE" in os.environ:
        return Path(os.environ["MEMSCAN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memscan"

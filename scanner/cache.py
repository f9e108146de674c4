"""Where memscan keeps derived artefacts (exported ONNX graphs, TensorRT engines, scan plans), and how one is made."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """`$MEMSCAN_CACHE`, else `$XDG_CACHE_HOME/memscan`, else `~/.cache/memscan`."""
    if "MEMSCAN_CACHE" in os.environ:
        return Path(os.environ["MEMSCAN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memscan"


def artefact_folder(root: str | Path, kind: str, key: str, settings: dict) -> Path:
    """`root/<kind>/<key>-<hash of settings>`: the folder of one artefact of weights `key` made with `settings`."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    safe_key = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return Path(root) / kind / f"{safe_key}-{digest}"


def build_artefact(target: Path, done: str, build: Callable[[Path], object]) -> Path:
    """`target`, made by `build(folder)` unless its file `done` exists: built in a private folder, then renamed, so that
    readers never see half of one; when another process finishes the same artefact first, theirs is kept."""
    if (target / done).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / done).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

"""Check a model folder's weight files before they are loaded: a truncated `.safetensors` file or
a folder of pickled `.bin` weights (unpickling runs code) is refused with one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import MemscanError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def check_safetensors(path: Path) -> None:
    """Refuse `path` unless its header parses and its size covers every tensor the header lists."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes in a file of {size}")
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise MemscanError(f"{path}: not a readable safetensors file ({exc})") from exc
    if 8 + header_len + end > size:
        raise MemscanError(f"{path}: truncated safetensors file ({size} of {8 + header_len + end} bytes); copy it again")


def check_weights(model: str | Path) -> None:
    """Check every weight file under a local model folder (a hub id, not a folder, is left to the loader).

    memscan loads safetensors only (`use_safetensors=True`): a component with pickled weights alone is refused.
    """
    folder = Path(model)
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*.safetensors")):
        check_safetensors(path)
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        pickles = [p for p in component.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles and not any(component.glob("*.safetensors")):
            raise MemscanError(
                f"{component}: weights only as pickles ({pickles[0].name}), which run code when loaded; "
                "convert them to safetensors (memscan loads no pickles)"
            )

"""A model folder on disk, without loading it: where it is (a folder, or the local Hugging Face cache), its
JSON files, and its fingerprint. Nothing here imports torch: a scan served by a plan (`scanner.plan`) checks
its model with these alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .cache import cache_dir
from .errors import MemscanError


def read_json(path: Path) -> dict:
    """A JSON file's content; a missing or malformed file is a one-line `MemscanError`."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise MemscanError(f"{path} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MemscanError(f"{path} is not valid JSON: {exc}") from exc


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a hub id looked up in the local Hugging Face cache only."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MemscanError(f"model {str(name_or_path)!r} is a file; expected a diffusers pipeline folder")
    name = str(name_or_path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        from huggingface_hub import constants, snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception as exc:  # huggingface_hub raises several types for "not cached"
            raise MemscanError(
                f"model {name!r} is not a folder and is not in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}); download it where there is network access, "
                f"or pass a local folder"
            ) from exc
    raise MemscanError(f"model folder {name!r} does not exist")


FINGERPRINT_CACHE = "fingerprints.json"  # in cache_dir(): {stat key: fingerprint}
FINGERPRINT_CACHE_ENTRIES = 256


def component_files(path: Path, components: tuple[str, ...]) -> list[Path]:
    """Every file of the pipeline's `components` folders, in a fixed order."""
    return [
        file
        for component in components
        if (path / component).is_dir()
        for file in sorted(p for p in (path / component).rglob("*") if p.is_file())
    ]


def hash_files(path: Path, files: list[Path]) -> str:
    """SHA-256 of the files' paths and contents (JSON canonicalised), as a short fingerprint."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        if file.suffix == ".json":
            # Key order and whitespace must not change the fingerprint.
            digest.update(json.dumps(read_json(file), sort_keys=True).encode())
        else:
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def stat_key(path: Path, files: list[Path]) -> str:
    """SHA-256 of the folder's path and each file's name, size and mtime: changes when any file does."""
    stats = [(f.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns) for f in files for st in (f.stat(),)]
    return hashlib.sha256(json.dumps([str(path.resolve()), stats]).encode()).hexdigest()


def fingerprint(path: Path, components: tuple[str, ...]) -> str:
    """Hash of every file of the pipeline's `components` folders (configs canonicalised, weights by content).

    Hashing reads every weight (gigabytes for SDXL), so the result is cached in
    `cache_dir()/fingerprints.json` under the folder's path and each file's name, size and
    mtime: any change to a file recomputes it.
    """
    files = component_files(path, components)
    key = stat_key(path, files)
    cache_file = cache_dir() / FINGERPRINT_CACHE
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if key in cached:
        return cached[key]
    value = hash_files(path, files)
    cached[key] = value
    entries = dict(list(cached.items())[-FINGERPRINT_CACHE_ENTRIES:])
    try:  # the cache is a convenience: a read-only home costs one re-hash per start, no error
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return value

"""A small text-to-image model with planted memorization, built by the project's own code."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# The bundled builds, by family: the SD 1.x-style testbed (the default `--model`) and the SD 3-style one.
BUNDLES = {"sd": "testbed", "sd3": "testbed_sd3"}


def default_model_path(family: str = "sd") -> Path:
    """The bundled testbed pipeline folder of `family` (the "sd" one is the default `--model`)."""
    return Path(str(resources.files("scanner.data").joinpath(BUNDLES[family])))


def default_labels_path(family: str = "sd") -> Path:
    """The bundled testbed's labelled evaluation prompts."""
    return default_model_path(family) / "eval_prompts.jsonl"

"""A small text-to-image model with planted memorization, built by the project's own code."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def default_model_path() -> Path:
    """The bundled testbed pipeline folder (the default `--model`)."""
    return Path(str(resources.files("scanner.data").joinpath("testbed")))


def default_labels_path() -> Path:
    """The bundled testbed's labelled evaluation prompts."""
    return default_model_path() / "eval_prompts.jsonl"

"""Shared fixtures. Triton kernels run on the CPU through its interpreter here."""

import os

# Must be set before triton decorates any kernel (at import of scanner.kernels).
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tiny_pipeline import build_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    """A saved SD 1.x-style (epsilon) pipeline with random weights."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd1", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    """A saved SD 2.x-style (v-prediction) pipeline with random weights."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd2", "sd2")

"""The native fused-norm ops (``memscan::guidance_norm``, ``memscan::guided_prediction``).

Built by the top-level ``CMakeLists.txt`` into ``libmemscan_ops.so`` (see docs/native.md);
optional: without the library, ``load_native_ops()`` is False and dispatch moves on to
Triton or the torch reference. The library is looked for at ``$MEMSCAN_NATIVE_LIB``, then
in this package's directory, then in ``<repo>/build/``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

LIBRARY_NAME = "libmemscan_ops.so"
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}  # the devices a kernel may be built for

# Why the library is not loaded (None once loaded); set by load_native_ops().
load_failure: str | None = "not tried yet"


def library_candidates() -> list[Path]:
    """Where the op library may be, in the order they are tried."""
    package_dir = Path(__file__).resolve().parent
    # In a checkout (editable install) package_dir is <repo>/kernels, so its parent is the repo.
    candidates = [package_dir / LIBRARY_NAME, package_dir.parent / "build" / LIBRARY_NAME]
    if os.environ.get("MEMSCAN_NATIVE_LIB"):
        candidates.insert(0, Path(os.environ["MEMSCAN_NATIVE_LIB"]))
    return candidates


@functools.cache
def load_native_ops() -> bool:
    """Load the op library once; False (reason in ``load_failure``) when absent or unloadable."""
    global load_failure
    found = [path for path in library_candidates() if path.is_file()]
    if not found:
        load_failure = f"{LIBRARY_NAME} not built (looked in {', '.join(map(str, library_candidates()))})"
        return False
    try:
        torch.ops.load_library(str(found[0]))
    except (OSError, RuntimeError) as error:  # e.g. built against another torch
        load_failure = f"{found[0]}: {error}"
        return False
    load_failure = None
    return True


def has_native_kernel(device: torch.device) -> bool:
    """Whether the loaded library has a kernel for ``device`` (CPU always, CUDA if built with it)."""
    return device.type in DISPATCH_KEYS and load_native_ops() and _has_kernel(DISPATCH_KEYS[device.type])


@functools.cache
def _has_kernel(dispatch_key: str) -> bool:
    return _ops().guidance_norm.default.has_kernel_for_dispatch_key(dispatch_key)


def supports(cond: torch.Tensor, uncond: torch.Tensor) -> bool:
    """Whether the native op can take these inputs: a native kernel, its dtypes, no autograd."""
    # The ops have no backward: inputs that need gradients go to the differentiable reference.
    needs_grad = torch.is_grad_enabled() and (cond.requires_grad or uncond.requires_grad)
    return cond.dtype in NATIVE_DTYPES and not needs_grad and has_native_kernel(cond.device)


def _ops():
    """The ``torch.ops.memscan`` namespace, loading the library first."""
    if not load_native_ops():
        raise RuntimeError(f"native ops not available: {load_failure}")
    return torch.ops.memscan


def guidance_norm_native(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Native op: per-row ``||cond - uncond||_2`` in fp32, shape ``[B]``."""
    return _ops().guidance_norm(cond, uncond)


def guided_prediction_native(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Native op: the norm and the guided prediction ``uncond + w * (cond - uncond)``."""
    return _ops().guided_prediction(cond, uncond, float(guidance_scale))

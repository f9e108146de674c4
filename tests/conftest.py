"""Shared fixtures. Triton kernels run on the CPU through its interpreter here."""

import os

# Must be set before triton decorates any kernel (at import of scanner.kernels).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Before torch loads, as `memscan` itself does (scanner/threads.py): tests that run a second process
# (serve, kill-and-resume, Ray workers) beside this one would otherwise spin against it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One torch thread per worker when pytest-xdist runs several (`-n auto`: one a core): more would share the
# cores between workers' threads (the suite's tests ran 10% faster so, on 2 cores). Tests of the thread
# policy set what they check themselves.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# A cache of this process's own (ONNX exports, fingerprints): tests never share one with each other's
# workers (pytest-xdist), nor with the user's ~/.cache/memscan.
if "MEMSCAN_CACHE" not in os.environ:
    import atexit  # noqa: E402
    import shutil  # noqa: E402
    import tempfile  # noqa: E402

    os.environ["MEMSCAN_CACHE"] = tempfile.mkdtemp(prefix="memscan-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MEMSCAN_CACHE"], ignore_errors=True)

import inspect  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tiny_families_diffusion import build_tiny_pixart, build_tiny_sdxl  # noqa: E402
from tiny_families_flow import build_tiny_flux, build_tiny_sd3  # noqa: E402
from tiny_pipeline import build_tiny_pipeline  # noqa: E402

TINY_FAMILY_BUILDERS = {"sdxl": build_tiny_sdxl, "pixart": build_tiny_pixart, "sd3": build_tiny_sd3, "flux": build_tiny_flux}


@pytest.fixture(autouse=True)
def fresh_random_state(request):
    """Reseed torch's and numpy's global RNGs from entropy before every test.

    A fixture or library call that seeds the global generator with a constant would otherwise
    make every later "random" input the same in each run. The seed is recorded in the test's
    user properties (in the JUnit XML) and printed, so a failing test's captured output shows it;
    reproduce with ``torch.manual_seed(seed); numpy.random.seed(seed % 2**32)``.
    """
    import numpy as np
    import torch

    seed = torch.seed()
    np.random.seed(seed % 2**32)
    request.node.user_properties.append(("torch_seed", seed))
    print(f"global RNG seed of this test: {seed} (torch.manual_seed; numpy.random.seed(seed % 2**32))")
    yield


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    """A saved SD 1.x-style (epsilon) pipeline with random weights."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd1", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    """A saved SD 2.x-style (v-prediction) pipeline with random weights."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd2", "sd2")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_family(name, **options)`: the folder of that family's tiny random pipeline (`TINY_FAMILY_BUILDERS`),
    saved once per session (a worker's) for each name and options, shared by every file: tests copy it to change it."""
    built: dict[tuple, Path] = {}

    def folder(name: str, **options) -> Path:
        builder = TINY_FAMILY_BUILDERS[name]
        bound = inspect.signature(builder).bind(None, **options)
        bound.apply_defaults()  # sd3 and sd3 with_t5=True are one folder
        key = (name, tuple(bound.arguments.items())[1:])
        if key not in built:
            built[key] = builder(tmp_path_factory.mktemp(f"tiny-{name}") / "model", **options)
        return built[key]

    return folder


@pytest.fixture(scope="session")
def planted_testbed() -> tuple[Path, list[dict]]:
    """The planted-memorization testbed model and its labelled prompts; skips when not built."""
    import json

    try:
        from scanner.testbed import default_labels_path, default_model_path
    except ImportError:
        pytest.skip("scanner.testbed is not on this branch (the testbed issue has not landed)")
    model, labels = default_model_path(), default_labels_path()
    if not (model / "unet").is_dir() or not labels.is_file():
        pytest.skip(f"the testbed model is not built at {model}")
    rows = [json.loads(line) for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    return model, rows

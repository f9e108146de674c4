"""`memscan scan --engine ray`: its options and its run (part of the CLI face).

Registered by `scanner.cli`; like the rest of the CLI it only parses, calls the library
(`scanner.ray_scan`) and leaves printing the summary to `cmd_scan`.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from .engines import ENGINES
from .errors import MemscanError

if TYPE_CHECKING:
    from .scan import ScanSummary

RAY_OPTIONS = ("ray_address", "workers", "gpus_per_worker", "worker_engine")


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """The options of `scan --engine ray`."""
    group = parser.add_argument_group("Ray (with --engine ray)")
    group.add_argument("--ray-address", help="Ray cluster to run on (default: $RAY_ADDRESS, else a new local Ray)")
    group.add_argument(
        "--workers", type=int, help="scoring workers, each with the model loaded (default: one per GPU, else one per CPU)"
    )
    group.add_argument(
        "--gpus-per-worker", type=float, help="GPUs each worker takes (default: 1 where the cluster has GPUs, else 0: CPU workers)"
    )
    group.add_argument("--worker-engine", help=f"each worker's UNet backend: {', '.join(ENGINES)} (default: torch)")


def check_ray_options(args: argparse.Namespace) -> bool:
    """True for `--engine ray`; a Ray option without it is a usage error."""
    given = [name for name in RAY_OPTIONS if getattr(args, name) is not None]
    if given and args.engine != "ray":
        raise MemscanError(f"--{given[0].replace('_', '-')} needs --engine ray")
    return args.engine == "ray"


def scan_on_ray(args: argparse.Namespace, **options: Any) -> ScanSummary:
    """The scan of `args` scored by a pool of Ray workers; `options` as for `run_scan`."""
    from .cli import _detect_settings, _quiet_libraries
    from .detect import ScannerSpec
    from .ray_scan import ray_connection, run_ray_scan

    spec = ScannerSpec(args.model, _detect_settings(args), args.device, args.dtype, args.worker_engine or "torch")
    with ray_connection(args.ray_address):
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False  # the command shows its own
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # not every run's execution plan
        return run_ray_scan(
            spec,
            args.inputs,
            args.out,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            worker_setup=_quiet_libraries,
            **options,
        )

"""`memscan scan`: score prompt files into a resumable Parquet/JSONL output, here or on Ray (`--engine ray`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MemscanError, one_line
from .common import (
    ENGINE_NAMES,
    EXIT_FLAGGED,
    EXIT_OK,
    add_threshold_options,
    detect_settings,
    load_scanner,
    model_command,
    output_file,
    positive,
    quiet_libraries,
    scanner_detector_and_threshold,
    scanner_spec,
    threshold_resolver,
)

if TYPE_CHECKING:
    from ..calibration import Threshold
    from ..detect import Scanner
    from ..detectors import Detector
    from ..plan import PlanScanner
    from ..scan import ScanSummary
    from ..threads import ThreadPolicy

RAY_OPTIONS = ("ray_address", "workers", "gpus_per_worker", "worker_engine")


def check_scan_output(path: str, overwrite: bool) -> Path:
    """The checks of `--out` that need no model, made before the slow load: suffix, folder, an existing output."""
    from ..io.journal import OUTPUT_SUFFIXES

    out = output_file(path, OUTPUT_SUFFIXES, create_parent=False)
    # With OUT.parts beside it the run resumes (or is refused, once the model fingerprint is known).
    if out.exists() and not overwrite and not out.with_name(out.name + ".parts").is_dir():
        raise MemscanError(f"{out} already exists; pass --overwrite to replace it")
    return out


def check_ray_options(args: argparse.Namespace) -> bool:
    """True for `--engine ray`; a Ray option without it, or a detector Ray workers do not run, is a usage error."""
    given = [name for name in RAY_OPTIONS if getattr(args, name) is not None]
    if given and args.engine != "ray":
        raise MemscanError(f"--{given[0].replace('_', '-')} needs --engine ray")
    if args.engine == "ray" and args.detector != "wen":
        raise MemscanError(f"Ray workers score with wen only: drop --detector {args.detector} or scan without --engine ray")
    return args.engine == "ray"


def scan_on_ray(args: argparse.Namespace, **options: Any) -> ScanSummary:
    """The scan of `args` scored by a pool of Ray workers; `options` as for `run_scan`."""
    from ..ray_scan import ray_connection, run_ray_scan

    spec = scanner_spec(args, engine=args.worker_engine or "torch")
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
            worker_setup=quiet_libraries,
            **options,
        )


def plan_refusal(args: argparse.Namespace) -> str | None:
    """Why no scan plan serves these options (known before any model is loaded); None when one can."""
    from ..model import DTYPES
    from ..plan import auto_device, settings_refusal

    if args.engine not in ("auto", "onnx"):
        return f"--engine {args.engine}"
    if args.detector != "wen":
        return f"--detector {args.detector}"
    if args.dtype not in ("auto", *DTYPES):
        return f"--dtype {args.dtype}"  # refused by the load, in its words
    device = auto_device() if args.device == "auto" else args.device
    dtype = DTYPES["fp32" if args.dtype == "auto" else args.dtype]
    return settings_refusal(detect_settings(args), device, dtype)


def planned_scanner(args: argparse.Namespace) -> PlanScanner | Scanner:
    """The scanner of the options' scan plan; on the first scan of a model and settings the model is loaded and
    the plan built. A family that cannot be planned keeps the loaded model's scanner (`--engine auto`: torch)."""
    from ..checkpoint import resolve_model_path
    from ..plan import PlanRequest, PlanScanner, ScanPlan, build_plan, discard, model_refusal
    from ..threads import record_threads

    request = PlanRequest(resolve_model_path(args.model), detect_settings(args))
    threads = record_threads(positive(args.threads, "--threads"))
    plan = ScanPlan.find(request)
    if plan is not None:
        try:
            return planned(PlanScanner(plan, threads.threads), args, threads)
        except MemoryError:
            raise
        except Exception as exc:  # ONNX Runtime and tokenizers raise types of their own for a damaged file
            print(f"memscan: the scan plan in {plan.folder} cannot be read ({one_line(exc)[:200]}); compiling it again",
                  file=sys.stderr, flush=True)
            discard(plan.folder)
    if args.engine == "auto":
        args.engine = "torch"
    loaded = load_scanner(args)
    # The load's own answers: torch may find a GPU no device node showed, a tokenizer may be slow.
    if model_refusal(loaded.model, request.settings) is not None:
        return loaded
    print(f"memscan: compiling the scan plan (once per model and settings) into {request.folder()} ...",
          file=sys.stderr, flush=True)
    try:
        plan = build_plan(loaded.model, request)
    except (OSError, RuntimeError) as exc:  # a full disk, an operator the exporter cannot write: the loaded model scans
        print(f"memscan: the scan plan could not be compiled ({one_line(exc)[:200]}); scanning with the {args.engine} "
              "engine", file=sys.stderr, flush=True)
        return loaded
    return planned(PlanScanner(plan, threads.threads), args, threads)


def planned(scanner: PlanScanner, args: argparse.Namespace, threads: ThreadPolicy) -> PlanScanner:
    """`scanner`, said on stderr, with the default batch size for its latents."""
    from ..model import default_batch_size

    print(f"memscan: loading model {args.model} from its scan plan ({threads.describe()})", file=sys.stderr, flush=True)
    if args.batch_size is None:
        args.batch_size = default_batch_size("cpu", scanner.model.latent_shape)
    return scanner


def scan_scanner(args: argparse.Namespace) -> tuple[Scanner | PlanScanner, Detector | None, Threshold]:
    """The scanner, detector and flagging threshold of `memscan scan`: its scan plan where one serves the options,
    else the options' `Scanner` (`--engine auto`: torch)."""
    from ..scan import scanner_settings

    if plan_refusal(args) is not None:
        if args.engine == "auto":
            args.engine = "torch"
        return scanner_detector_and_threshold(args, args.detector)
    resolve = threshold_resolver(args)
    scanner = planned_scanner(args)
    return scanner, None, resolve(str(scanner.model.source), scanner.model.fingerprint, scanner_settings(scanner))


def cmd_scan(args: argparse.Namespace) -> int:
    """Score prompt files into a Parquet/JSONL output."""
    from ..io import check_inputs, input_bytes
    from ..scan import run_scan
    from ..threads import current_threads
    from .progress import ScanBar

    check_inputs(args.inputs, args.field)  # input and output errors before the slow model load
    check_scan_output(args.out, args.overwrite)
    if args.checkpoint_rows < 1:
        raise MemscanError(f"--checkpoint-rows must be >= 1, got {args.checkpoint_rows}")
    if args.engine not in ("auto", *ENGINE_NAMES, "ray"):
        raise MemscanError(f"unknown engine {args.engine!r} (available: auto, {', '.join(ENGINE_NAMES)}, ray)")
    chosen: list[Threshold] = []
    if check_ray_options(args):  # the workers load the model; the threshold is resolved against their settings
        resolve = threshold_resolver(args)

        def choose(model_path: str, fingerprint: str, settings: dict) -> float | None:
            chosen.append(resolve(model_path, fingerprint, settings))
            return chosen[-1].value

        scanner = detector = None
    else:
        scanner, detector, threshold = scan_scanner(args)
        chosen.append(threshold)
    # Bytes read of the inputs' size give the total and an ETA; Ray workers report rows only.
    with ScanBar(None if scanner is None else input_bytes(args.inputs)) as bar:
        options = dict(
            field=args.field, batch_size=args.batch_size, overwrite=args.overwrite, progress=bar.add_rows,
            commit_rows=args.checkpoint_rows,
        )
        if scanner is None:
            from ..model import default_batch_size

            options["batch_size"] = args.batch_size or default_batch_size("cuda" if args.gpus_per_worker else "cpu")
            summary = scan_on_ray(args, choose_threshold=choose, **options)
        else:
            from ..plan import PlanScanner

            try:
                summary = run_scan(scanner, args.inputs, args.out, threshold=chosen[0].value, wait=args.wait,
                                   read=bar.read, detector=detector, **options)
            finally:  # after Ctrl-C, the plan's queued batches are not run before the process ends
                if isinstance(scanner, PlanScanner):
                    scanner.close()
    threshold = chosen[0]
    flagged = "n/a (no threshold)" if threshold.value is None else f"{summary.flagged} ({threshold.describe()})"
    resumed = f" ({summary.resumed} rows resumed)" if summary.resumed else ""
    runtime = "Ray workers" if scanner is None else current_threads().describe()
    print(
        f"scored {summary.scored}{resumed}, flagged {flagged}, rejected {summary.rejected}, "
        f"{summary.prompts_per_s:.1f} prompts/s ({runtime}) -> {summary.out} (rejects: {summary.rejects})"
    )
    return EXIT_FLAGGED if args.fail_on_flagged and summary.flagged else EXIT_OK


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
    group.add_argument("--worker-engine", help=f"each worker's UNet backend: {', '.join(ENGINE_NAMES)} (default: torch)")


def add_scan_command(commands: argparse._SubParsersAction) -> None:
    """Register `scan` on the `memscan` subparsers."""
    scan = model_command(
        commands,
        "scan",
        cmd_scan,
        flagged=True,
        resumable=True,
        detector=True,
        help="score prompt files for memorization",
        description="Score every prompt of the inputs; resumable: re-run the same command after a crash.",
        engine="auto",
        engine_help=f"UNet backend: auto (default: a scan plan where one serves the options, see README; else torch), "
        f"{', '.join(ENGINE_NAMES)}; or ray: score on a Ray cluster, each worker running --worker-engine",
    )
    scan.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt (a prompt a line), .jsonl, .csv or .parquet; or a quoted glob")
    scan.add_argument("--out", required=True, help="output file, .parquet or .jsonl (rejects go to STEM.rejects.jsonl beside it)")
    scan.add_argument("--field", help="jsonl/csv/parquet field holding the prompt (default: prompt, caption or text)")
    add_threshold_options(scan)
    scan.add_argument("--fail-on-flagged", action="store_true", help="exit with code 3 when any prompt is flagged")
    scan.add_argument("--overwrite", action="store_true", help="replace an existing output or another run's partial output")
    scan.add_argument(
        "--checkpoint-rows", type=int, default=2048, help="commit results at least every N rows (and every 30 s)"
    )
    scan.add_argument(
        "--wait", type=float, default=60.0, metavar="S",
        help="if another scan is writing --out, wait up to S seconds for it, then exit 2 (default: 60)",
    )
    add_ray_options(scan)

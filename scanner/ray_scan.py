"""`memscan scan --engine ray`: the scan job on a Ray cluster, one model per worker.

Ray Data streams it through three stages:

1. read tasks, one per input file, run the single-process reader (`read_prompts`), so
   ids, row indices and rejection reasons are the same by construction;
2. a pool of scorer actors (Ray Data's batch-inference pattern) each load the model once
   and score batches: one GPU each where the cluster has GPUs, CPU workers otherwise;
3. the driver receives the rows in input order and commits them through the same output
   journal as `run_scan`: the same files and schema, and an interrupted run resumes.

Inputs and the model are opened at the same paths on every node (shared storage; relative
paths from the command's working folder).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from itertools import islice
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import torch

from .detect import ScannerSpec
from .errors import MemscanError
from .io import InputRow, check_inputs, count_rows, read_prompts
from .io.journal import RESULT_SCHEMA
from .model import identify_model, resolve_dtype, resolve_model_path
from .calibration import Calibration
from .scan import ScanOutput, ScanSummary, result_rows, run_key, settings_record

INPUT_SCHEMA = pa.schema([("id", pa.string()), ("index", pa.int64()), ("prompt", pa.string()), ("error", pa.string())])
# A worker's output: result rows, and rejected rows (id and reason only), with their input index.
SCORED_SCHEMA = RESULT_SCHEMA.append(pa.field("index", pa.int64())).append(pa.field("reason", pa.string()))
# Ray Data packs a task's output into blocks of up to 128 MiB, and a block is scored by one
# worker: a whole input file would be. Small blocks (about a hundred prompts) spread every
# file over the workers.
BLOCK_BYTES = 16 * 1024
READ_CHUNK_ROWS = 1024
# A user-fixable error raised in a worker (engine not installed there, model missing on a
# node) reaches the driver only as text inside Ray's error: its last line names it.
WORKER_ERROR = re.compile(r"^\S*\b(?:MemscanError|EngineUnavailable): (.+)$", re.MULTILINE)


def require_ray() -> ModuleType:
    """The `ray` module, or a `MemscanError` that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the `data` extra: pandas, pyarrow, fsspec)
    except ImportError:
        raise MemscanError("--engine ray needs Ray Data: pip install 'memscan[ray]'") from None
    return ray


@contextmanager
def ray_connection(address: str | None = None) -> Iterator[None]:
    """Connected to Ray at `address` (default: $RAY_ADDRESS, else a new local Ray) for the block.

    A connection the caller already holds (a notebook, a Ray job, a test) is used as is.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    _check_reachable(target)
    try:
        ray.init(address=target, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MemscanError(f"cannot connect to Ray at {target!r}: {reason}") from exc
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail fast where nothing listens at a `host:port` address: Ray retries it for minutes."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # "local", "auto": Ray resolves those itself, and fails fast
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise MemscanError(f"cannot reach Ray at {address!r}: {exc.strerror or exc}") from None


def _read_tasks(paths: Sequence[Path], field: str | None, resumed: int) -> list[dict]:
    """One read task per input file with rows left: its path, first row index, rows to skip."""
    tasks, first_index = [], 0
    for path in paths:
        rows = count_rows(path, field)
        skip = max(0, resumed - first_index)
        if skip < rows:
            tasks.append({"path": str(path), "first_index": first_index, "skip": skip})
        first_index += rows
    return tasks


def _read_files(tasks: pa.Table, field: str | None, base: str) -> Iterator[pa.Table]:
    """Ray Data read stage: the rows of each task's file, as the single-process scan reads them.

    `base` is the command's working folder: a worker runs in another one.
    """
    for task in tasks.to_pylist():
        rows = islice(read_prompts([Path(task["path"])], field, task["first_index"], Path(base)), task["skip"], None)
        while chunk := list(islice(rows, READ_CHUNK_ROWS)):
            yield pa.Table.from_pylist([row._asdict() for row in chunk], schema=INPUT_SCHEMA)


class ScoreBatches:
    """Ray Data scorer: loads the model once per worker, then scores batches of input rows."""

    def __init__(self, spec: ScannerSpec, threshold: float | None, setup: Callable[[], None] | None = None):
        """`setup` runs first in the worker's process (the command silences library chatter with it)."""
        if setup is not None:
            setup()
        self.scanner = spec.load()
        self.threshold = threshold
        self.settings = settings_record(self.scanner.settings, self.scanner.model.dtype, self.scanner.engine.name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Result rows for the prompts, (id, reason) rows for the rejects, in input order."""
        rows = [InputRow(**row) for row in batch.to_pylist()]
        prompts = [r for r in rows if r.error is None]
        results = iter([])
        if prompts:
            scores = self.scanner.score([r.prompt for r in prompts], [r.index for r in prompts])
            results = iter(result_rows(prompts, scores, self.scanner.model.fingerprint, self.settings, self.threshold))
        out = [
            {**next(results), "index": r.index} if r.error is None else {"id": r.id, "index": r.index, "reason": r.error}
            for r in rows
        ]
        return pa.Table.from_pylist(out, schema=SCORED_SCHEMA)


def _worker_resources(workers: int | None, gpus_per_worker: float | None) -> tuple[int, float]:
    """(workers, GPUs each): by default one worker per GPU of the cluster, else one per CPU."""
    import ray

    cluster = ray.cluster_resources()
    gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
    per_worker = (1.0 if gpus else 0.0) if gpus_per_worker is None else gpus_per_worker
    if per_worker < 0:
        raise MemscanError(f"--gpus-per-worker must be >= 0, got {per_worker}")
    if per_worker and not gpus:
        raise MemscanError(f"--gpus-per-worker {per_worker:g} asked for, but the Ray cluster has no GPU")
    count = workers if workers is not None else max(1, int(gpus // per_worker if per_worker else cpus))
    if count < 1:
        raise MemscanError(f"--workers must be >= 1, got {count}")
    return count, per_worker


@contextmanager
def _ordered_small_blocks() -> Iterator[None]:
    """Ray Data options for the datasets built in the block: input order kept, small blocks."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = context.execution_options.preserve_order, context.target_max_block_size
    context.execution_options.preserve_order = True  # the journal commits contiguous row ranges
    context.target_max_block_size = BLOCK_BYTES
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.target_max_block_size = saved


def run_ray_scan(
    spec: ScannerSpec,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    field: str | None = None,
    batch_size: int = 16,
    threshold: float | None = None,
    calibration: Calibration | None = None,
    choose_threshold: Callable[[str, str, dict], float | None] | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    progress: Callable[[int], None] | None = None,
    commit_rows: int = 2048,
    commit_seconds: float = 30.0,
    worker_setup: Callable[[], None] | None = None,
) -> ScanSummary:
    """`run_scan` with the scoring spread over Ray workers (a connection to Ray must be open).

    `worker_setup`, a module-level function, runs in each worker before it loads the model.
    A `calibration` (checked against the model and the workers' settings) sets the threshold, or
    `choose_threshold(model folder, fingerprint, settings record)` does.
    """
    ray = require_ray()
    paths = check_inputs(inputs, field)
    model_path = resolve_model_path(spec.model)
    family, model_fingerprint = identify_model(model_path)  # model errors here, in one line, not in every worker
    count, per_worker = _worker_resources(workers, gpus_per_worker)
    spec = replace(spec, model=str(model_path.resolve()))  # a worker runs in another folder
    if spec.device == "auto":
        spec = replace(spec, device="cuda" if per_worker else "cpu")
    elif torch.device(spec.device).type == "cuda" and not per_worker:
        raise MemscanError(f"--device {spec.device} needs GPUs for the workers (--gpus-per-worker)")
    # The key single-process `run_scan` writes for the same run: either can resume the other.
    settings = settings_record(spec.settings.for_family(family), resolve_dtype(spec.dtype, torch.device(spec.device)), spec.engine)
    if calibration is not None:
        calibration.check(model_fingerprint, json.loads(settings))
        threshold = calibration.threshold
    if choose_threshold is not None:  # the CLI's resolution of its flagging options, once the model is known
        threshold = choose_threshold(str(model_path), model_fingerprint, json.loads(settings))
    key = run_key(paths, field, model_fingerprint, settings, threshold)
    output = ScanOutput(out, key, inputs=paths, overwrite=overwrite, commit_rows=commit_rows, commit_seconds=commit_seconds)
    tasks = _read_tasks(paths, field, output.resumed)
    if tasks:
        with _ordered_small_blocks(), _worker_errors_in_one_line(ray):
            rows = ray.data.from_items(tasks).map_batches(
                _read_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"field": field, "base": os.getcwd()}, num_cpus=0
            )
            scored = rows.map_batches(
                ScoreBatches,
                batch_size=batch_size,
                batch_format="pyarrow",
                fn_constructor_kwargs={"spec": spec, "threshold": threshold, "setup": worker_setup},
                compute=ray.data.ActorPoolStrategy(size=count),
                num_cpus=1,  # Ray then runs the worker with one thread (OMP_NUM_THREADS=1)
                num_gpus=per_worker,
            )
            for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
                if not table.num_rows:
                    continue
                _add_scored(output, table.to_pylist())
                if progress is not None:
                    progress(table.num_rows)
    return output.finish()


@contextmanager
def _worker_errors_in_one_line(ray) -> Iterator[None]:
    """Re-raise a worker's user-fixable error as a `MemscanError`; anything else (a bug) as is."""
    try:
        yield
    except ray.exceptions.RayError as exc:
        found = WORKER_ERROR.findall(str(exc))
        if not found:
            raise
        raise MemscanError(f"a Ray worker failed: {found[-1]}") from exc


def _add_scored(output: ScanOutput, rows: list[dict]) -> None:
    """Hand a worker's rows to the output: results and rejects, up to the last row's index."""
    if rows[0]["index"] != output.end:  # preserve_order must hand rows back in input order
        raise RuntimeError(f"Ray returned row {rows[0]['index']} where row {output.end} was due")
    results = [{name: row[name] for name in RESULT_SCHEMA.names} for row in rows if row["reason"] is None]
    rejects = [{"id": row["id"], "reason": row["reason"]} for row in rows if row["reason"] is not None]
    output.add(results, rejects, rows[-1]["index"] + 1)

"""The scan job: stream prompts from files through a `Scanner` into a resumable output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from .detect import Scanner
from .encode import TokenizedPrompts
from .io import InputRow, ScanJournal, check_inputs, read_prompts, rejects_path
from .prefetch import prefetch


@dataclass
class ScanSummary:
    """What a scan did: this run's work and the whole output's totals."""

    scored: int  # prompts scored by this run
    resumed: int  # input rows already committed by an earlier, interrupted run
    rows: int  # result rows in the output
    flagged: int
    rejected: int
    seconds: float
    out: Path
    rejects: Path

    @property
    def prompts_per_s(self) -> float:
        """Prompts scored per second by this run."""
        return self.scored / self.seconds if self.seconds > 0 else 0.0


def batch_rows(rows: Iterable[InputRow], batch_size: int) -> Iterator[list[InputRow]]:
    """Group rows so that each group holds `batch_size` prompts; rejected rows ride along."""
    group: list[InputRow] = []
    prompts = 0
    for row in rows:
        group.append(row)
        prompts += row.error is None
        if prompts == batch_size:
            yield group
            group, prompts = [], 0
    if group:
        yield group


def tokenized_batches(
    scanner: Scanner, groups: Iterable[list[InputRow]]
) -> Iterator[tuple[list[InputRow], TokenizedPrompts | None]]:
    """Each group with its prompts tokenized: run in the prefetch thread, off the model's path."""
    for group in groups:
        prompts = [r.prompt for r in group if r.error is None]
        yield group, scanner.encoder.tokenize(prompts) if prompts else None


def settings_fields(scanner: Scanner) -> dict:
    """What makes a score what it is: the detection settings, the dtype and the engine."""
    return {**scanner.settings.to_dict(), "dtype": str(scanner.model.dtype).removeprefix("torch."), "engine": scanner.engine.name}


def settings_record(scanner: Scanner) -> str:
    """The settings string stored in every result row."""
    return json.dumps(settings_fields(scanner), sort_keys=True)


def run_scan(
    scanner: Scanner,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    field: str | None = None,
    batch_size: int = 16,
    threshold: float | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    commit_rows: int = 2048,
    commit_seconds: float = 30.0,
) -> ScanSummary:
    """Score every prompt of `inputs` into `out` (.parquet or .jsonl), resuming an interrupted run."""
    paths = check_inputs(inputs, field)
    settings = settings_record(scanner)
    run_key = {
        "inputs": [str(p) for p in paths],
        "field": field,
        "model": scanner.model.fingerprint,
        "settings": settings,
        "threshold": threshold,
    }
    journal = ScanJournal(out, run_key, overwrite=overwrite)
    resumed = journal.committed_rows
    started = time.perf_counter()
    scored = 0
    part_start = end = resumed
    results, rejects = [], []
    last_commit = time.monotonic()
    rows = islice(read_prompts(paths, field), resumed, None)
    # The empty prompt's embedding first: from here on only the prefetch thread tokenizes
    # (a fast tokenizer must not be entered from two threads at once).
    scanner.encoder.empty_embedding()
    for group, tokens in prefetch(tokenized_batches(scanner, batch_rows(rows, batch_size))):
        prompts = [r for r in group if r.error is None]
        if prompts:
            batch = scanner.score([r.prompt for r in prompts], [r.index for r in prompts], tokens)
            scores = batch.score  # a property computing the mean: once per batch, not per row
            for i, row in enumerate(prompts):
                score = float(scores[i])
                results.append(
                    {
                        "id": row.id,
                        "prompt": row.prompt,
                        "score": score,
                        "scores": [float(s) for s in batch.per_generation[i]],
                        "flagged": None if threshold is None else score >= threshold,
                        "n_tokens": batch.n_tokens[i],
                        "truncated": batch.truncated[i],
                        "model": scanner.model.fingerprint,
                        "settings": settings,
                    }
                )
        rejects.extend({"id": r.id, "reason": r.error} for r in group if r.error is not None)
        scored += len(prompts)
        end = group[-1].index + 1
        if len(results) + len(rejects) >= commit_rows or time.monotonic() - last_commit >= commit_seconds:
            journal.commit(part_start, end, results, rejects)
            part_start, results, rejects = end, [], []
            last_commit = time.monotonic()
        if progress is not None:
            progress(len(group))
    if end > part_start or journal.committed_rows == 0:
        journal.commit(part_start, end, results, rejects)
    totals = journal.finalize()
    return ScanSummary(
        scored=scored,
        resumed=resumed,
        rows=totals.rows,
        flagged=totals.flagged,
        rejected=totals.rejected,
        seconds=time.perf_counter() - started,
        out=journal.out,
        rejects=rejects_path(journal.out),
    )

"""The sweep job: score the prompts of the inputs that the store does not hold yet for this model
and settings, and add them.

Reading, rejects, batching, tokenizing ahead and prefetching are the scan's (`scanner.io`,
`scanner.scan`). Unlike a scan, a sweep skips a bad input file (rejected with its reason)
instead of refusing to start, since one bad log must not stop a nightly run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..detect import Scanner
from ..detectors import Detector
from ..errors import MemscanError, one_line
from ..io import InputRow, check_inputs, read_prompts
from ..prefetch import prefetch
from ..scan import batch_rows, settings_record, submit_batch, tokenized_batches
from .store import ScoredPrompt, SweepStore, normalize_prompt, prompt_key


@dataclass
class SweepSummary:
    """What a sweep found; `new` includes prompts an interrupted attempt of the same sweep stored."""

    sweep: int
    config: int
    resumed: bool  # this run continued a sweep that was killed
    rows: int  # input rows read, a rejected file counting as one
    new: int  # prompts this sweep added to the store
    known: int  # rows whose prompt the store held already, or which repeat one read earlier
    rejected: int
    flagged: int | None  # new prompts with score >= threshold; None without a threshold
    threshold: float | None
    scored: int  # prompts this run scored
    seconds: float

    @property
    def prompts_per_s(self) -> float:
        """Prompts scored per second by this run."""
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        """Input rows swept per second by this run, known and rejected ones included."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def usable_inputs(inputs: Sequence[str | Path], field: str | None = None) -> tuple[list[Path], list[InputRow]]:
    """The inputs that pass `check_inputs`, and a reject row (id: the file) for each of the others."""
    if not inputs:
        raise MemscanError("no input files given")
    usable, rejected = [], []
    for raw in inputs:
        path = Path(raw)
        try:
            usable += check_inputs([path], field)
        except MemscanError as exc:
            rejected.append(InputRow(str(path), -1, None, one_line(str(exc).removeprefix(f"{path}: "))))
    if not usable:
        raise MemscanError("no readable input: " + "; ".join(f"{row.id}: {row.error}" for row in rejected))
    return usable, rejected


def _readable_rows(paths: Sequence[Path], field: str | None) -> Iterator[InputRow]:
    """The rows of each file; a file that breaks while being read is rejected from there on."""
    for path in paths:
        rows = read_prompts([path], field)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except MemscanError as exc:  # the readers' "unreadable after row N" for corrupt or vanished data
                yield InputRow(str(path), -1, None, str(exc).removeprefix(f"{path}: "))
                break
            yield row


def _new_prompts(store: SweepStore, config: int, chunk: list[InputRow]) -> list[InputRow]:
    """The chunk's prompts that the store does not hold, normalized, each once (at its first row)."""
    valid = [row._replace(prompt=normalize_prompt(row.prompt)) for row in chunk if row.error is None]
    known = store.known(config, [prompt_key(row.prompt) for row in valid])
    first: dict[str, InputRow] = {}
    for row in valid:
        if prompt_key(row.prompt) not in known:
            first.setdefault(row.prompt, row)
    return list(first.values())


def run_sweep(
    scanner: Scanner,
    store: SweepStore,
    paths: Sequence[Path],
    rejected_files: Sequence[InputRow] = (),
    *,
    field: str | None = None,
    batch_size: int = 16,
    threshold: float | None = None,
    progress: Callable[[int], None] | None = None,
    commit_rows: int = 2048,
    commit_seconds: float = 30.0,
    detector: Detector | None = None,
) -> SweepSummary:
    """Score and store the new prompts of `paths`; `rejected_files` (from `usable_inputs`) are recorded.

    `detector` (over `scanner`) scores instead of Wen's score; its name and settings are part of the
    config, so the store keeps each detector's scores apart."""
    if scanner.settings.noise != "shared":
        raise MemscanError("a sweep stores one score per prompt, so it needs --noise shared (reference noise depends on position)")
    started = time.perf_counter()
    store.begin()
    config = store.config_id(
        scanner.model.fingerprint, settings_record(scanner.settings, scanner.model.dtype, scanner.engine.name, detector)
    )
    sweep, resumed = store.start_sweep(config, [str(p) for p in (*paths, *(r.id for r in rejected_files))], threshold)
    store.add_rejects(sweep, [(row.id, row.error) for row in rejected_files])
    rows = rejected = len(rejected_files)
    scored = pending = 0
    last_commit = time.monotonic()
    # The empty prompt's embedding first: from here on only the prefetch threads tokenize.
    scanner.family.unconditional()
    for chunk in prefetch(batch_rows(_readable_rows(paths, field), commit_rows)):
        new = _new_prompts(store, config, chunk)
        chunk_rejects = [(row.id, row.error) for row in chunk if row.error is not None]
        store.add_rejects(sweep, chunk_rejects)
        rows, rejected = rows + len(chunk), rejected + len(chunk_rejects)
        if progress is not None:
            progress(len(chunk) - len(new))
        for group, tokens in prefetch(tokenized_batches(scanner, batch_rows(new, batch_size))):
            result = submit_batch(scanner, detector, [row.prompt for row in group], tokens=tokens).result()
            scores = result.score  # a property computing the mean: once per batch
            store.add(
                config,
                sweep,
                [
                    ScoredPrompt(prompt_key(row.prompt), row.prompt, float(scores[i]), result.n_tokens[i], result.truncated[i], row.id)
                    for i, row in enumerate(group)
                ],
            )
            scored, pending = scored + len(group), pending + len(group)
            if pending >= commit_rows or time.monotonic() - last_commit >= commit_seconds:
                store.commit()  # a kill loses at most what was scored since here
                store.begin()
                pending, last_commit = 0, time.monotonic()
            if progress is not None:
                progress(len(group))
    new_total = store.count(sweep)
    flagged = None if threshold is None else store.count(sweep, threshold)
    seconds = time.perf_counter() - started
    # Known rows by difference: after a resume, the prompts the killed attempt stored are
    # found in the store again, but they are this sweep's new prompts.
    counts = {"rows": rows, "new": new_total, "known": rows - rejected - new_total, "rejected": rejected, "flagged": flagged}
    store.finish_sweep(sweep, {**counts, "seconds": seconds})
    store.commit()
    return SweepSummary(sweep, config, resumed, **counts, threshold=threshold, scored=scored, seconds=seconds)

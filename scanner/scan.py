"""The scan job: stream prompts from files through a `Scanner` (or a scan plan's `PlanScanner`) into a resumable output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .encode import TokenizedPrompts
from .io import MAX_PROMPT_CHARS, InputRow, ScanJournal, check_inputs, read_prompts, rejects_path
from .prefetch import produced_ahead
from .scores import DetectSettings, PendingScores, PromptScores, ReadyScores

if TYPE_CHECKING:
    from .detect import Scanner
    from .detectors import Detector
    from .plan import PlanScanner


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


# Prompts per tokenizer call: one Rust call and one padded array per chunk instead of per batch
# (bench/RESULTS.md, "Tokenization and the orchestrator"); the chunk's ids are 600 KB at CLIP's 77 tokens.
TOKENIZE_CHUNK = 1024


# A block: consecutive groups of rows, with the ids of their prompts (None when all were rejected).
Block = tuple[list[list[InputRow]], TokenizedPrompts | None]


def tokenized_blocks(scanner: Scanner | PlanScanner, groups: Iterable[list[InputRow]], chunk: int = TOKENIZE_CHUNK) -> Iterator[Block]:
    """Groups tokenized together, at least `chunk` prompts at a time (or what is left): what a scan's reading
    process produces, and what crosses to the model's process (one item per block, not per batch)."""
    block: list[list[InputRow]] = []
    prompts: list[str] = []
    for group in groups:
        block.append(group)
        prompts.extend(r.prompt for r in group if r.error is None)
        if len(prompts) >= chunk:
            yield block, scanner.family.tokenize(prompts)
            block, prompts = [], []
    if block:
        yield block, scanner.family.tokenize(prompts) if prompts else None


def pinned_for(scanner: Scanner | PlanScanner, blocks: Iterable[Block]) -> Iterator[Block]:
    """`blocks` with their ids in pinned memory when the model is on CUDA (a pageable copy to the device
    would wait for the batch before it); as they are elsewhere."""
    if not str(scanner.model.device).startswith("cuda"):
        yield from blocks
        return
    for block, tokens in blocks:
        yield block, None if tokens is None else tokens.pinned()


def split_blocks(blocks: Iterable[Block]) -> Iterator[tuple[list[InputRow], TokenizedPrompts | None]]:
    """Each block's groups one by one, each with its rows of the block's ids (views, nothing copied)."""
    for block, tokens in blocks:
        start = 0
        for group in block:
            count = sum(r.error is None for r in group)
            yield group, tokens.rows(start, start + count) if count else None
            start += count


def tokenized_batches(
    scanner: Scanner | PlanScanner, groups: Iterable[list[InputRow]], chunk: int = TOKENIZE_CHUNK
) -> Iterator[tuple[list[InputRow], TokenizedPrompts | None]]:
    """Each group with its prompts tokenized (`tokenized_blocks`, then split), ids pinned on CUDA: read ahead
    of the model in one process (a sweep's, in a thread)."""
    return split_blocks(pinned_for(scanner, tokenized_blocks(scanner, groups, chunk)))


def own_score(detector: Detector | None) -> bool:
    """True when `detector` is None or `wen`: the scanner's own score (per generation, either noise mode)."""
    return detector is None or detector.name == "wen"


def detector_fields(detector: Detector | None) -> dict:
    """What a detector adds to the settings record: nothing for Wen's score (its records stay as they were),
    else its name and settings, so that resumes, stores and calibrations never mix detectors."""
    if own_score(detector):
        return {}
    described = detector.describe()
    # Through JSON, as a calibration file reads it back: a tuple setting must compare equal to its list.
    return json.loads(json.dumps({"detector": described["detector"], "detector_settings": described["settings"]}))


def settings_fields(settings: DetectSettings, dtype: Any, engine: str, detector: Detector | None = None) -> dict:
    """What makes a score what it is: the detection settings, the dtype (a torch dtype or its name), the engine and
    the detector."""
    return {**settings.to_dict(), "dtype": str(dtype).removeprefix("torch."), "engine": engine, **detector_fields(detector)}


def scanner_settings(scanner: Scanner | PlanScanner, detector: Detector | None = None) -> dict:
    """`settings_fields` of a loaded scanner (scoring with `detector`, default Wen's)."""
    return settings_fields(scanner.settings, scanner.model.dtype, scanner.engine.name, detector)


def settings_record(settings: DetectSettings, dtype: Any, engine: str, detector: Detector | None = None) -> str:
    """The settings string stored in every result row."""
    return json.dumps(settings_fields(settings, dtype, engine, detector), sort_keys=True)


def submit_batch(
    scanner: Scanner | PlanScanner, detector: Detector | None, prompts: list[str], indices: Sequence[int] | None = None,
    tokens: TokenizedPrompts | None = None,
) -> PendingScores:
    """The prompts' scores by the scanner (Wen's: per generation, `Scanner.submit`) or by `detector` (one value
    per prompt, as a one-generation row, ready at once); `indices` and `tokens` as for `Scanner.score`."""
    if own_score(detector):
        return scanner.submit(prompts, indices, tokens)
    if tokens is None:
        tokens = scanner.family.tokenize(prompts)
    return PendingScores.of(ReadyScores(detector.score(prompts, tokens)[:, None]), tokens)


def run_key(paths: Sequence[Path], field: str | None, model: str, settings: str, threshold: float | None) -> dict:
    """What identifies a scan's output: a re-run with the same key resumes it, any other is refused."""
    return {"inputs": [str(p) for p in paths], "field": field, "model": model, "settings": settings, "threshold": threshold}


def result_rows(
    rows: Sequence[InputRow], scores: PromptScores, model: str, settings: str, threshold: float | None
) -> list[dict]:
    """The output rows (`RESULT_SCHEMA`) of the scored prompts `rows`."""
    # Python floats of the whole batch at once: per row and element, numpy's scalars cost a third of the rows' time.
    means, per_generation = scores.score.tolist(), scores.per_generation.tolist()
    return [
        {
            "id": row.id,
            "prompt": row.prompt,
            "score": means[i],
            "scores": per_generation[i],
            "flagged": None if threshold is None else means[i] >= threshold,
            "n_tokens": scores.n_tokens[i],
            "truncated": scores.truncated[i],
            "model": model,
            "settings": settings,
        }
        for i, row in enumerate(rows)
    ]


class ScanOutput:
    """A scan's output while it runs: rows arrive in input order and are committed to the
    journal every `commit_rows` rows or `commit_seconds`, so an interrupted run resumes.

    It holds the output's lock (another scan of `out` waits up to `wait_s`) until `finish` or `close`."""

    def __init__(
        self,
        out: str | Path,
        key: dict,
        *,
        inputs: Sequence[Path] = (),
        overwrite: bool = False,
        commit_rows: int = 2048,
        commit_seconds: float = 30.0,
        wait_s: float = 60.0,
    ):
        self.journal = ScanJournal(out, key, overwrite=overwrite, inputs=inputs, wait_s=wait_s)
        self.resumed = self.end = self._start = self.journal.committed_rows
        self.scored = 0
        self.commit_rows, self.commit_seconds = commit_rows, commit_seconds
        self._results: list[dict] = []
        self._rejects: list[dict] = []
        self._started = time.perf_counter()
        self._last_commit = time.monotonic()

    def add(self, results: list[dict], rejects: list[dict], end: int) -> None:
        """Rows of the next input rows, up to row `end` (exclusive); commits when due."""
        self._results.extend(results)
        self._rejects.extend(rejects)
        self.scored += len(results)
        self.end = end
        pending = len(self._results) + len(self._rejects)
        if pending >= self.commit_rows or time.monotonic() - self._last_commit >= self.commit_seconds:
            self._commit()

    def _commit(self) -> None:
        self.journal.commit(self._start, self.end, self._results, self._rejects)
        self._start, self._results, self._rejects = self.end, [], []
        self._last_commit = time.monotonic()

    def finish(self) -> ScanSummary:
        """Commit what is pending, merge the parts into the output; what this run did."""
        if self.journal.merged is None and (self.end > self._start or self.journal.committed_rows == 0):
            self._commit()
        totals = self.journal.finalize()
        return ScanSummary(
            scored=self.scored,
            resumed=self.resumed,
            rows=totals.rows,
            flagged=totals.flagged,
            rejected=totals.rejected,
            seconds=time.perf_counter() - self._started,
            out=self.journal.out,
            rejects=rejects_path(self.journal.out),
        )

    def close(self) -> None:
        """Release the output's lock without finishing (after a failure: the parts stay for a resume)."""
        self.journal.close()


def run_scan(
    scanner: Scanner | PlanScanner,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    field: str | None = None,
    batch_size: int = 16,
    threshold: float | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    read: Callable[[int], None] | None = None,
    commit_rows: int = 2048,
    commit_seconds: float = 30.0,
    wait: float = 60.0,
    max_prompt_chars: int = MAX_PROMPT_CHARS,
    detector: Detector | None = None,
) -> ScanSummary:
    """Score every prompt of `inputs` into `out` (.parquet or .jsonl), resuming an interrupted run.

    Another scan writing `out` is waited for up to `wait` seconds; prompts over `max_prompt_chars`
    characters are rejected unscored. `progress` gets the rows done after each batch, `read` the
    input bytes done through it (of `scanner.io.input_bytes(inputs)`). `detector` (over `scanner`) scores
    instead of the scanner's own score, Wen's; its name and settings join the settings record."""
    paths = check_inputs(inputs, field)
    model = scanner.model.fingerprint
    settings = settings_record(scanner.settings, scanner.model.dtype, scanner.engine.name, detector)
    key = run_key(paths, field, model, settings, threshold)
    output = ScanOutput(
        out, key, inputs=paths, overwrite=overwrite, commit_rows=commit_rows, commit_seconds=commit_seconds, wait_s=wait
    )

    def emit(group: list[InputRow], prompts: list[InputRow], pending: PendingScores | None) -> None:
        """A scored group's rows and rejects into the output, in input order."""
        results = result_rows(prompts, pending.result(), model, settings, threshold) if pending is not None else []
        rejects = [{"id": r.id, "reason": r.error} for r in group if r.error is not None]
        output.add(results, rejects, group[-1].index + 1)
        if progress is not None:
            progress(len(group))
        if read is not None:
            read(group[-1].offset)

    try:
        rows = islice(read_prompts(paths, field, max_chars=max_prompt_chars), output.resumed, None)
        # The empty prompt's embedding first: from here on only the reading process (or thread) tokenizes
        # (a fast tokenizer must not be entered from two threads at once).
        scanner.family.unconditional()
        # Read and tokenized ahead by a child process: its Python does not take turns with the model's.
        blocks = produced_ahead(tokenized_blocks(scanner, batch_rows(rows, batch_size)))
        # Each batch is submitted before the one before it is read back: the device never waits on the host.
        previous: tuple[list[InputRow], list[InputRow], PendingScores | None] | None = None
        for group, tokens in split_blocks(pinned_for(scanner, blocks)):
            prompts = [r for r in group if r.error is None]
            pending = None
            try:
                if prompts:
                    pending = submit_batch(scanner, detector, [r.prompt for r in prompts], [r.index for r in prompts], tokens)
            finally:  # a batch that fails still leaves the one before it in the output
                if previous is not None:
                    emit(*previous)
            previous = group, prompts, pending
        if previous is not None:
            emit(*previous)
        return output.finish()
    finally:
        output.close()  # after finish a no-op; after a failure the next run may take the output

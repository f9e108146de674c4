"""What a score is, without torch: the detection settings, a batch's scores, and the prompt cache.

The scan loop, the reading process and a compiled scan plan (`scanner.plan`) use these alone, so that a
scan served by a plan never imports torch; `scanner.detect` computes them with the model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .errors import MemscanError

if TYPE_CHECKING:
    from .encode import TokenizedPrompts
    from .families import Family

SCORE_SPACES = ("epsilon", "model")  # where a difference of two denoiser outputs is measured (`Trajectory.score_scale`)
NOISE_MODES = ("shared", "reference")


@dataclass(frozen=True)
class DetectSettings:
    """How prompts are scored; the defaults are the paper's first-step, one-generation detector."""

    num_inference_steps: int = 50
    start_step: int = 0
    end_step: int = 1
    generations: int = 1
    guidance_scale: float | None = None  # None: the family's (`Family.default_guidance_scale`)
    seed: int = 0
    noise: str = "shared"
    score_space: str = "auto"  # "auto": the family's own (epsilon for diffusion, the velocity for flows)

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise MemscanError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not 0 <= self.start_step < self.end_step <= self.num_inference_steps:
            raise MemscanError(
                f"step window [{self.start_step}, {self.end_step}) must satisfy "
                f"0 <= start < end <= num_inference_steps ({self.num_inference_steps})"
            )
        if self.generations < 1:
            raise MemscanError(f"generations must be >= 1, got {self.generations}")
        if self.noise not in NOISE_MODES:
            raise MemscanError(f"noise must be one of {', '.join(NOISE_MODES)}, got {self.noise!r}")
        if self.score_space not in ("auto", *SCORE_SPACES):
            raise MemscanError(f"score space must be one of auto, {', '.join(SCORE_SPACES)}, got {self.score_space!r}")

    def for_family(self, family: type[Family]) -> DetectSettings:
        """These settings with what was left to the family resolved: its score space and guidance scale (what results record)."""
        return replace(
            self,
            score_space=family.default_score_space() if self.score_space == "auto" else self.score_space,
            guidance_scale=family.default_guidance_scale if self.guidance_scale is None else self.guidance_scale,
        )

    @property
    def first_step_only(self) -> bool:
        """True when only `x_T` at the first timestep is scored (no trajectory needed)."""
        return self.start_step == 0 and self.end_step == 1

    def to_dict(self) -> dict:
        """Plain-data form, recorded with every result."""
        return asdict(self)


@dataclass
class PromptScores:
    """Scores of a batch: per generation `[B, n]` (mean over the window's steps)."""

    per_generation: np.ndarray
    n_tokens: list[int]
    truncated: list[bool]

    @property
    def score(self) -> np.ndarray:
        """Each prompt's score: the mean over generations, `[B]`."""
        return self.per_generation.mean(axis=1)


class HostScores(Protocol):
    """Per-generation scores `[B, n]` of one computed batch: `numpy()` waits for them where they are not on the host."""

    def numpy(self) -> np.ndarray: ...

    def failed(self) -> bool:
        """Whether computing them failed or was cancelled (a cache must not serve them)."""
        ...


class ReadyScores:
    """Scores already on the host (a detector's): `numpy()` returns them."""

    def __init__(self, values: np.ndarray):
        """`values` `[B, n]` fp32."""
        self._values = values

    def numpy(self) -> np.ndarray:
        """The scores."""
        return self._values

    def failed(self) -> bool:
        """Never: they are here."""
        return False


# One prompt's scores: (the batch computed with it, its row there, its token count, truncated).
ScoreRow = tuple[HostScores, int, int, bool]


@dataclass
class PendingScores:
    """A submitted batch: each prompt's row of scores in the `HostScores` of the batch that computed it."""

    rows: list[ScoreRow]

    @classmethod
    def of(cls, copy: HostScores, tokens: TokenizedPrompts) -> PendingScores:
        """Every row of `copy`, computed for `tokens`."""
        return cls([(copy, i, n, t) for i, (n, t) in enumerate(zip(tokens.n_tokens, tokens.truncated))])

    def result(self) -> PromptScores:
        """The batch's scores (waits for the device where they are not on the host yet)."""
        copies = {id(r[0]): r[0] for r in self.rows}
        if len(copies) == 1:  # the usual case, one computed batch: one gather, not a row at a time
            values = next(iter(copies.values())).numpy()[[r[1] for r in self.rows]]
        else:
            values = np.stack([copy.numpy()[i] for copy, i, _, _ in self.rows])
        return PromptScores(values, [r[2] for r in self.rows], [r[3] for r in self.rows])


class ScoreCache:
    """The scores of recently scored prompts (shared noise: a prompt's score depends on the prompt alone), least
    recently used first out."""

    def __init__(self, size: int):
        self.size = size
        self._rows: OrderedDict[str, ScoreRow] = OrderedDict()

    def missing(self, prompts: Sequence[str]) -> dict[str, int]:
        """Each prompt not cached, with its first row in `prompts`; the cached ones become the most recently used."""
        todo: dict[str, int] = {}
        for row, prompt in enumerate(prompts):
            cached = self._rows.get(prompt)
            if cached is not None and not cached[0].failed():
                self._rows.move_to_end(prompt)
            else:  # a batch that failed (or was cancelled) is computed again
                todo.setdefault(prompt, row)
        return todo

    def rows(self, prompts: Sequence[str], fresh: dict[str, ScoreRow]) -> PendingScores:
        """The rows of `prompts` (from `fresh`, the batch just computed, else the cache); `fresh` is cached."""
        rows = [fresh.get(p) or self._rows[p] for p in prompts]
        self._rows.update(fresh)  # new keys: they go in last, as the most recently used
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)
        return PendingScores(rows)

    def __iter__(self) -> Iterator[str]:
        """The cached prompts, least recently used first."""
        return iter(self._rows)


def cached_scores(
    cache: ScoreCache, prompts: Sequence[str], tokens: TokenizedPrompts, compute: Callable[[TokenizedPrompts], HostScores]
) -> PendingScores:
    """`prompts`' scores, each distinct prompt not in `cache` computed once by `compute(its tokens)` (one batch)."""
    todo = cache.missing(prompts)
    fresh: dict[str, ScoreRow] = {}
    if todo:
        computed = tokens.select(todo.values())
        fresh = dict(zip(todo, PendingScores.of(compute(computed), computed).rows))
    return cache.rows(prompts, fresh)

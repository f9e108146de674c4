"""Progress bars of the long-running commands: tqdm on stderr, off when stderr is not a terminal.

stdout carries only a command's result, so bars never go there; `bar` is the one place the
commands' bars are configured (explain, scan and the testbed commands share it).
"""

from __future__ import annotations

import sys
from typing import Any

# None: tqdm turns the bar off when stderr is not a terminal (pipes, CI logs); tests set False.
DISABLE: bool | None = None


def bar_options(desc: str, unit: str = " prompts", **options: Any) -> dict[str, Any]:
    """The tqdm keyword arguments of a command's bar (also for a diffusers pipeline's own bar)."""
    return {"desc": desc, "unit": unit, "disable": DISABLE, "file": sys.stderr, "dynamic_ncols": True, **options}


def bar(desc: str, total: int | None = None, unit: str = " prompts", **options: Any) -> Any:
    """A tqdm bar on stderr for `total` units of work (None: a counter without ETA)."""
    from tqdm import tqdm

    return tqdm(total=total, **bar_options(desc, unit, **options))


def show_pipeline_progress(pipeline: Any, desc: str) -> None:
    """Show a diffusers pipeline's denoising steps as a bar (the families turn its own bar off)."""
    pipeline.set_progress_bar_config(**bar_options(desc, unit=" steps"))  # left on screen: it ends at its total


class ScanBar:
    """`scan`'s bar: input bytes read of `total` bytes (total and ETA), the prompt count beside it;
    without a total (Ray reports rows, not bytes) a prompt counter."""

    def __init__(self, total: int | None):
        """`total`: bytes of all inputs, or None where bytes are not reported."""
        if total is None:
            self._bar = bar("scanning")
        else:
            self._bar = bar(
                "scanning", total=total, unit="B", unit_scale=True, unit_divisor=1024,
                bar_format="{l_bar}{bar}| {n_fmt}B/{total_fmt}B read [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
            )
        self._by_bytes = total is not None
        self.rows = 0

    def __enter__(self) -> ScanBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def add_rows(self, rows: int) -> None:
        """`rows` more input rows are done."""
        self.rows += rows
        if self._by_bytes:
            self._bar.set_postfix_str(f"{self.rows} prompts", refresh=False)
        else:
            self._bar.update(rows)

    def read(self, offset: int) -> None:
        """The inputs are done up to byte `offset` (of all inputs, in order)."""
        self._bar.update(offset - self._bar.n)

"""Nightly sweeps: score only the prompts a store has not seen for this model and settings, keep
every score in SQLite, and report each sweep (HTML, JSON) with the trend over past sweeps."""

from .report import prepare_report_dir, write_report
from .run import SweepSummary, run_sweep, usable_inputs
from .store import SweepStore, normalize_prompt, prompt_key

__all__ = [
    "SweepStore",
    "SweepSummary",
    "normalize_prompt",
    "prepare_report_dir",
    "prompt_key",
    "run_sweep",
    "usable_inputs",
    "write_report",
]

"""Reading prompt rows and writing result rows; knows nothing of models."""

from .journal import ScanJournal, rejects_path
from .readers import SUPPORTED_SUFFIXES, InputRow, check_inputs, count_rows, read_prompts

__all__ = ["InputRow", "SUPPORTED_SUFFIXES", "ScanJournal", "check_inputs", "count_rows", "read_prompts", "rejects_path"]

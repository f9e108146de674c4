"""Reading prompt rows and writing result rows; knows nothing of models."""

from .journal import ScanJournal, rejects_path
from .readers import MAX_PROMPT_CHARS, SUPPORTED_SUFFIXES, InputRow, check_inputs, count_rows, input_bytes, read_prompts

__all__ = ["InputRow", "MAX_PROMPT_CHARS", "SUPPORTED_SUFFIXES", "ScanJournal", "check_inputs", "count_rows", "input_bytes", "read_prompts", "rejects_path"]

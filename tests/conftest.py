"""Shared fixtures. Triton kernels run on the CPU through its interpreter here."""

import os

# Must be set before triton decorates any kernel (at import of scanner.kernels).
os.environ.setdefault("TRITON_INTERPRET", "1")

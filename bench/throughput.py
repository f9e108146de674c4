"""First-step throughput side by side: the same as `memscan bench` (see `memscan bench --help`).

    python bench/throughput.py --quick               # testbed model, CPU, under a minute
    python bench/throughput.py --sd15 --prompts 4    # SD 1.5-shaped UNet, random weights
    python bench/throughput.py --orchestrator        # reading/tokenizing/writing, no-op model
"""

from __future__ import annotations

import sys

from scanner.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

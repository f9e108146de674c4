"""Whole-process `memscan scan` of testbed prompts under CPU thread policies, interleaved, with the load.

    python bench/threads.py --prompts 512 --rounds 3            # as the machine is
    python bench/threads.py --prompts 512 --rounds 3 --busy 1   # with one busy-looping process beside it

Each policy is an environment (OMP_NUM_THREADS, OMP_WAIT_POLICY) or `memscan scan --threads`; rounds
interleave the policies so that a change in the machine's load hits them all alike. Prints the median
wall seconds and prompts/s per policy, and the 1-minute load average before each round.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (extra environment, extra scan options); memscan's own default is the last.
POLICIES: dict[str, tuple[dict[str, str], list[str]]] = {
    "1 thread, active wait": ({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}, []),
    "all cores, active wait": ({"OMP_NUM_THREADS": str(os.cpu_count()), "OMP_WAIT_POLICY": "ACTIVE"}, []),
    "all cores, passive wait": ({"OMP_NUM_THREADS": str(os.cpu_count()), "OMP_WAIT_POLICY": "PASSIVE"}, []),
    # A bounded spin (libgomp's GOMP_SPINCOUNT; about 100,000 spins a millisecond): spin, then sleep.
    "all cores, spin 10k then sleep": ({"OMP_NUM_THREADS": str(os.cpu_count()), "GOMP_SPINCOUNT": "10000"}, []),
    "all cores, spin 1k then sleep": ({"OMP_NUM_THREADS": str(os.cpu_count()), "GOMP_SPINCOUNT": "1000"}, []),
    "all cores, spin 3k then sleep": ({"OMP_NUM_THREADS": str(os.cpu_count()), "GOMP_SPINCOUNT": "3000"}, []),
    "memscan default": ({}, []),
}


def _spin() -> None:
    while True:
        pass


def run_scan(prompts: Path, env: dict[str, str], options: list[str]) -> tuple[float, float]:
    """One `memscan scan` process: (wall seconds, the prompts/s it reports)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "scanner.cli", "scan", str(prompts), "--out", f"{folder}/s.jsonl", *options],
            env={**clean, **env}, capture_output=True, text=True, check=True,
        )
        wall = time.perf_counter() - began
    return wall, float(re.search(r"([\d.]+) prompts/s", done.stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes to run beside the scans")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    from scanner.testbed import default_labels_path

    rows = default_labels_path().read_text().splitlines()[: args.prompts]
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for spinner in spinners:
        spinner.start()
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in POLICIES}
    loads = []
    with tempfile.TemporaryDirectory() as folder:
        prompts = Path(folder) / "prompts.txt"
        prompts.write_text("".join(json.loads(row)["prompt"].replace("\n", " ") + "\n" for row in rows))
        for _ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for name, (env, options) in POLICIES.items():
                figures[name].append(run_scan(prompts, env, options))
    for spinner in spinners:
        spinner.terminate()
    print(f"{args.prompts} prompts, {os.cpu_count()} CPUs, {args.busy} busy loops beside, "
          f"load before each round: {', '.join(f'{load:.2f}' for load in loads)}")
    result = {}
    for name, runs in figures.items():
        wall = statistics.median(w for w, _ in runs)
        rate = statistics.median(r for _, r in runs)
        spread = max(w for w, _ in runs) - min(w for w, _ in runs)
        print(f"  {name:32s} wall {wall:6.1f} s (spread {spread:4.1f} s), scoring {rate:6.1f} prompts/s")
        result[name] = {"wall_s": wall, "prompts_per_s": rate, "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps({"loads": loads, "busy": args.busy, "policies": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Scaling of `memscan scan --engine ray` with the number of workers, on a local Ray.

    python bench/ray_scaling.py                        # 2,000 prompts, 1 and 2 CPU workers, testbed model
    python bench/ray_scaling.py --prompts 500 --workers 1,2,4 --model path/to/sd

The same generated prompt file is scanned once per worker count (and once by the
single-process scan, the reference), each run writing its own output. Two rates per run:
end to end (model loads included; on Ray also worker start-up) and steady (from the first
rows back to the end, which is what more prompts would run at). CPU workers take one CPU
and one thread each (the single-process scan one thread too), so use at most as many
workers as free cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scanner.benchmark import sample_prompts
from scanner.detect import DetectSettings, ScannerSpec
from scanner.ray_scan import run_ray_scan
from scanner.scan import ScanSummary, run_scan
from scanner.testbed import default_model_path


@dataclass
class Run:
    """One scan's throughput: end to end, and from its first results on."""

    name: str
    prompts: int
    seconds: float
    steady_prompts_per_s: float

    @property
    def prompts_per_s(self) -> float:
        """Prompts per second, end to end."""
        return self.prompts / self.seconds


class Clock:
    """A scan's progress callback that remembers when the first rows came back."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: tuple[float, int] | None = None

    def __call__(self, rows: int) -> None:
        """Record the first batch's arrival."""
        if self.first is None:
            self.first = (time.perf_counter(), rows)

    def run(self, name: str, summary: ScanSummary) -> Run:
        """The run's figures once its scan has returned."""
        end = time.perf_counter()
        first_at, first_rows = self.first
        return Run(name, summary.scored, end - self.started, (summary.scored - first_rows) / (end - first_at))


def measure(model: str, prompts: int, worker_counts: list[int], batch_size: int, folder: Path) -> list[Run]:
    """Scan the same `prompts`-prompt file single-process, then on Ray with each worker count."""
    import ray

    inputs = folder / "prompts.txt"
    inputs.write_text("".join(p + "\n" for p in sample_prompts(prompts)), encoding="utf-8")
    spec = ScannerSpec(model, DetectSettings(), device="cpu")
    torch.set_num_threads(1)  # as each CPU worker runs
    clock = Clock()
    summary = run_scan(spec.load(), [inputs], folder / "single.parquet", batch_size=batch_size, progress=clock)
    runs = [clock.run("single process", summary)]
    ray.init(address="local", num_cpus=max(worker_counts), object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        for workers in worker_counts:
            clock = Clock()
            out = folder / f"ray-{workers}.parquet"
            summary = run_ray_scan(spec, [inputs], out, batch_size=batch_size, workers=workers, progress=clock)
            runs.append(clock.run(f"ray, {workers} worker{'s' * (workers > 1)}", summary))
    finally:
        ray.shutdown()
    return runs


def format_table(runs: list[Run]) -> str:
    """A Markdown table of the runs, speed-ups relative to the first Ray run."""
    base = next(r for r in runs if r.name.startswith("ray")).steady_prompts_per_s
    lines = ["| run | prompts | seconds | prompts/s end to end | prompts/s steady | steady vs 1 worker |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        ratio = f"{r.steady_prompts_per_s / base:.2f}x" if r.name.startswith("ray") else ""
        lines.append(f"| {r.name} | {r.prompts} | {r.seconds:.1f} | {r.prompts_per_s:.1f} | {r.steady_prompts_per_s:.1f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run the scans, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_path()), help="diffusers pipeline folder (default: the testbed)")
    parser.add_argument("--prompts", type=int, default=2000, help="prompts to scan per run (default: 2000)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: 1,2)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per UNet batch (default: 16)")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        runs = measure(args.model, args.prompts, worker_counts, args.batch_size, Path(folder))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.model}: {args.prompts} prompts, batch {args.batch_size}, CPU workers of 1 thread; {os.cpu_count()} cores, load average {load}")
    print(format_table(runs))


if __name__ == "__main__":
    main()

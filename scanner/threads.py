"""The CPU thread policy of a memscan process: OpenMP threads that sleep when idle, one torch thread
per CPU the process may use (or `--threads`), and the machine's load recorded beside the figures.

Why passive waiting: torch's OpenMP threads spin between parallel regions by default; on a machine
shared with other jobs (the normal case for a nightly sweep) the spinning threads take the cores the
work needs, and a scan ran 5-7x slower than with one thread. With passive waiting all cores are as
fast as one thread on a busy machine and faster on an idle one (bench/threads.py; bench/RESULTS.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def prefer_passive_wait() -> None:
    """Let OpenMP's idle threads sleep (unless the environment already says); effective only before torch loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's limit, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPolicy:
    """How many torch threads run, why, and the load the machine had when they were chosen."""

    threads: int
    source: str  # "--threads", "OMP_NUM_THREADS" or "CPUs available"
    load_average: float  # the 1-minute load average at start-up
    cpus: int

    @property
    def busy(self) -> bool:
        """Other work holds at least half the CPUs: figures measured now are not the machine's best."""
        return self.load_average >= self.cpus / 2

    def describe(self) -> str:
        """E.g. "2 threads (CPUs available), load 0.31 on 2 CPUs"."""
        plural = "s" * (self.threads != 1)
        return f"{self.threads} thread{plural} ({self.source}), load {self.load_average:.2f} on {self.cpus} CPUs"

    def record(self) -> dict[str, object]:
        """The fields every summary carries."""
        return {"threads": self.threads, "threads_from": self.source, "load_average": round(self.load_average, 2),
                "cpus": self.cpus}


def choose_threads(requested: int | None = None) -> ThreadPolicy:
    """`requested` (`--threads`), else `$OMP_NUM_THREADS` when it is a count, else every available CPU."""
    cpus = available_cpus()
    env = os.environ.get("OMP_NUM_THREADS", "")
    if requested is not None:
        threads, source = requested, "--threads"
    elif env.isdigit() and int(env) > 0:
        threads, source = int(env), "OMP_NUM_THREADS"
    else:
        threads, source = cpus, "CPUs available"
    return ThreadPolicy(threads, source, os.getloadavg()[0], cpus)


_applied: ThreadPolicy | None = None  # the process's thread count (torch's, or a scan plan's runs'), recorded once chosen


def record_threads(requested: int | None = None) -> ThreadPolicy:
    """Choose the thread count and record it as the process's (for a process that runs no torch: a scan plan's)."""
    global _applied
    _applied = choose_threads(requested)
    return _applied


def apply_threads(requested: int | None = None) -> ThreadPolicy:
    """Choose the thread count, record it, and set torch's intra-op threads to it."""
    import torch

    policy = record_threads(requested)
    torch.set_num_threads(policy.threads)
    return policy


def current_threads() -> ThreadPolicy:
    """The policy `record_threads` or `apply_threads` set, else torch's own thread count with today's load."""
    if _applied is not None:
        return _applied
    import torch

    return ThreadPolicy(torch.get_num_threads(), "torch default", os.getloadavg()[0], available_cpus())

"""A bounded load test of `memscan serve`'s app on 127.0.0.1 only: POST /v1/score at a fixed
concurrency, then the figures (requests, concurrency, p50/p99, errors by status, RSS before and after).

    python bench/service_load.py --requests 400 --concurrency 16 --max-seconds 120   # testbed model, CPU

It never listens beyond loopback and stops at --requests or --max-seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import threading
import time
from collections import Counter


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def _load(port: int, requests: int, concurrency: int, prompts: int, max_seconds: float) -> tuple[list[float], Counter]:
    import httpx

    latencies: list[float] = []
    statuses: Counter = Counter()
    deadline = time.monotonic() + max_seconds
    queue = iter(range(requests))
    rng = random.Random(0)

    async def client(http: httpx.AsyncClient) -> None:
        for _ in queue:
            if time.monotonic() >= deadline:
                return
            body = {"prompts": [f"a photo of item {rng.randrange(10**6)} on a table" for _ in range(prompts)]}
            began = time.perf_counter()
            try:
                response = await http.post("/v1/score", json=body)
                statuses[response.status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
                continue
            latencies.append(time.perf_counter() - began)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return latencies, statuses


def main() -> None:
    """Serve the model on a free loopback port in a thread, load it, print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the bundled testbed)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=1, help="prompts per request")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()

    import numpy as np
    import uvicorn

    from scanner.detect import DetectSettings, Scanner
    from scanner.model import load_model
    from scanner.service import create_app
    from scanner.testbed import default_model_path

    scanner = Scanner(load_model(args.model or default_model_path(), device="cpu"), DetectSettings())
    app = create_app(scanner)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    asyncio.run(_load(port, 8, 1, args.prompts, 60))  # warm-up: caches, first batch
    rss_before = _rss_mib()
    began = time.monotonic()
    latencies, statuses = asyncio.run(_load(port, args.requests, args.concurrency, args.prompts, args.max_seconds))
    seconds = time.monotonic() - began
    rss_after = _rss_mib()
    server.should_exit = True
    thread.join(timeout=30)
    ms = np.array(latencies) * 1000
    print(json.dumps({
        "requests": sum(statuses.values()), "concurrency": args.concurrency, "prompts_per_request": args.prompts,
        "seconds": round(seconds, 1), "requests_per_s": round(sum(statuses.values()) / seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "statuses": dict(statuses), "errors": sum(n for s, n in statuses.items() if s != 200),
        "rss_mib_before": round(rss_before, 1), "rss_mib_after": round(rss_after, 1),
        "batches": app.state.batcher.calls,
    }, indent=2))


if __name__ == "__main__":
    main()

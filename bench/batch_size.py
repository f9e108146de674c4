"""The scoring rate against the batch size, per engine, in one process, on the bundled testbed (CPU).

    python bench/batch_size.py --prompts 1024 --rounds 3 [--engines torch onnx plan plan-unfused] [--sizes 16 64 128 256 512]

`plan` is the testbed's scan plan (`scanner/plan.py`, built into the cache when missing), the
scorer `memscan scan` runs by default; `plan-unfused` the same plan with torch's own attention ops
in its graph instead of the fused `Attention` (docs/engines.md). Each (engine, batch size) scores the same prompts with a scanner that keeps no score cache; rounds
take every setting in turn, so that load from other processes falls on all of them alike. Prints
the median prompts/s and each setting's median ratio to the first batch size of its engine, over
rounds (each round's ratio is of two timings made one after the other), and each median's share of
this CPU's fp32 roofline (bench/roofline.py: the testbed's FLOPs per prompt against the matmul peak
measured at the start of the same round; the median over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from roofline import flops_per_prompt, matmul_peak  # bench/, beside this file

if TYPE_CHECKING:
    from scanner.model import ScanModel
    from scanner.plan import ScanPlan


def unfused_copy(plan: ScanPlan, model: ScanModel, folder: Path) -> ScanPlan:
    """A copy of `plan` in `folder` whose graph has torch's own attention ops (what the fused `Attention` replaced)."""
    from scanner.detect import DetectSettings, Scanner
    from scanner.engines.onnx_export import export_named
    from scanner.plan import GRAPH_FILE, ScanPlan, scorer_module

    shutil.copytree(plan.folder, folder / "plan")
    scanner = Scanner(model, DetectSettings())  # the settings main's plan is built with
    spec = {name: ((saved["max_length"],), "int64") for name, saved in plan.manifest["tokenizers"].items()}
    export_named(scorer_module(scanner), spec, ("scores",), folder / "plan" / GRAPH_FILE)
    return ScanPlan(folder / "plan", {**plan.manifest, "fused_attention": False}, plan.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["torch", "onnx", "plan"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[16, 64, 128, 256, 512])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    from scanner.threads import apply_threads, prefer_passive_wait

    prefer_passive_wait()  # memscan's own policy, set before torch loads
    from scanner.cache import cache_dir
    from scanner.detect import DetectSettings, Scanner
    from scanner.engines import create_engine
    from scanner.model import load_model
    from scanner.plan import PlanRequest, PlanScanner, build_plan
    from scanner.testbed import default_labels_path, default_model_path

    threads = apply_threads()
    scratch = tempfile.TemporaryDirectory()
    model = load_model(default_model_path(), device="cpu")
    rows = default_labels_path().read_text().splitlines()
    prompts = [json.loads(row)["prompt"] for row in rows[: args.prompts]]
    scanners = {}
    for name in args.engines:
        if name in ("plan", "plan-unfused"):
            plan = build_plan(model, PlanRequest(default_model_path(), DetectSettings()))
            if name == "plan-unfused":
                plan = unfused_copy(plan, model, Path(scratch.name))
            scanner = PlanScanner(plan, threads.threads, cache_size=0)
        else:
            engine = create_engine(name, model.family.denoiser_module(), cache_dir=cache_dir(), cache_key=model.fingerprint)
            scanner = Scanner(model, DetectSettings(), engine=engine, cache_size=0)
        for size in args.sizes:  # warm-up: exports, sessions and allocations for every shape
            scanner.score(prompts[:size])
        scanners[name] = scanner
    rates: dict[tuple[str, int], list[float]] = {(e, s): [] for e in args.engines for s in args.sizes}
    loads = []
    peaks = []  # each round's own: the machine's speed drifts between rounds, and a fraction is of one moment
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        peaks.append(matmul_peak(threads.threads))
        for (name, size), runs in rates.items():
            began = time.perf_counter()
            for i in range(0, len(prompts), size):
                scanners[name].score(prompts[i : i + size])
            runs.append(len(prompts) / (time.perf_counter() - began))
    flops = flops_per_prompt()
    print(f"{len(prompts)} testbed prompts, {args.rounds} rounds, {threads.describe()}, load before each round: "
          f"{', '.join(f'{load:.2f}' for load in loads)}; {flops / 1e6:.1f} MFLOP per prompt, fp32 matmul peak "
          f"{', '.join(f'{peak:.1f}' for peak in peaks)} GFLOP/s")
    result = {}
    for (name, size), runs in rates.items():
        base = rates[(name, args.sizes[0])]
        ratio = statistics.median(r / b for r, b in zip(runs, base))
        roofline = statistics.median(rate * flops / 1e9 / peak for rate, peak in zip(runs, peaks))
        print(f"  {name:6s} batch {size:4d}: {statistics.median(runs):7.1f} prompts/s "
              f"(spread {max(runs) / min(runs):.2f}), {ratio:.2f}x batch {args.sizes[0]}, {roofline:.0%} of the roofline")
        result[f"{name}/{size}"] = {"prompts_per_s": runs, "ratio": ratio, "roofline_fraction": roofline}
    if args.json:
        record = {"loads": loads, "threads": threads.describe(), "flops_per_prompt": flops, "matmul_peak_gflops": peaks,
                  "settings": result}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

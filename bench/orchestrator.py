"""The orchestrator (`memscan bench --orchestrator`) and `PromptTokenizer.tokenize` of source trees, interleaved.

    python bench/orchestrator.py                                       # this checkout
    python bench/orchestrator.py --trees ../before . --rounds 3         # before and after a change, side by side
    python bench/orchestrator.py --prompts 1000000 --batch-size 128    # the issue's million prompts

Each tree (a checkout's root) goes first on the PYTHONPATH of its own processes. A round runs, for every tree in
turn, the tokenize micro-benchmark (the testbed's CLIP tokenizer, per batch size) and then a whole
`memscan bench --orchestrator` process, so that a change in the machine's load falls on all trees alike. Prints
per tree the medians over rounds (prompts/s, and prompts per CPU second: what the work costs, whatever share of
the cores other jobs leave it) and, for the later trees, the median round-by-round ratio to the first one, with
the 1-minute load average before each round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TOKENIZE = """
import json, sys
from transformers import AutoTokenizer
from scanner.benchmark import sample_prompts, tokenize_throughput
from scanner.encode import PromptTokenizer
from scanner.testbed import default_model_path

tokenizer = PromptTokenizer(AutoTokenizer.from_pretrained(default_model_path() / "tokenizer"))
prompts = sample_prompts(int(sys.argv[1]))
print(json.dumps({size: tokenize_throughput(tokenizer, prompts, int(size)) for size in sys.argv[2:]}))
"""


def _run(tree: Path, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], env=env, cwd=tree, capture_output=True, text=True, check=True).stdout


def measure(tree: Path, prompts: int, batch_size: int, tokenize_prompts: int, tokenize_batches: list[int]) -> dict:
    """One tree's figures: tokenize prompts/s per batch size, then the orchestrator's JSON row."""
    rates = json.loads(_run(tree, ["-c", TOKENIZE, str(tokenize_prompts), *map(str, tokenize_batches)]))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "orchestrator.json"
        _run(tree, ["-m", "scanner.cli", "bench", "--orchestrator", "--prompts", str(prompts),
                    "--batch-size", str(batch_size), "--json", str(out)])
        row = json.loads(out.read_text())[0]
    figures = {}
    for size, (rate, per_cpu_s) in rates.items():
        figures[f"tokenize {size}"], figures[f"tokenize {size} per CPU s"] = rate, per_cpu_s
    return {**figures, "orchestrator": row["prompts_per_s"], "orchestrator per CPU s": row["prompts_per_cpu_s"],
            "peak MB": row["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", type=Path, default=[Path(__file__).resolve().parent.parent])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=200_000, help="orchestrator prompts (default: 200,000)")
    parser.add_argument("--batch-size", type=int, default=16, help="the scan's batch size (default: 16, memscan scan's)")
    parser.add_argument("--tokenize-prompts", type=int, default=20_480)
    parser.add_argument("--tokenize-batches", type=int, nargs="+", default=[16, 128, 1024])
    parser.add_argument("--json", help="also write every round's figures to this file")
    args = parser.parse_args()

    trees = [tree.resolve() for tree in args.trees]
    rounds: list[list[dict]] = []
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        rounds.append([measure(tree, args.prompts, args.batch_size, args.tokenize_prompts, args.tokenize_batches)
                       for tree in trees])
        print(f"round {len(rounds)} (load {loads[-1]:.2f}): "
              + " | ".join(", ".join(f"{k} {v:,.0f}" for k, v in figures.items()) for figures in rounds[-1]),
              flush=True)
    print(f"{args.prompts} prompts, batch {args.batch_size}, {os.cpu_count()} CPUs, "
          f"load before each round: {', '.join(f'{load:.2f}' for load in loads)}")
    for i, tree in enumerate(trees):
        print(f"  {tree}")
        for key in rounds[0][i]:
            median = statistics.median(r[i][key] for r in rounds)
            ratio = "" if i == 0 else f"  ({statistics.median(r[i][key] / r[0][key] for r in rounds):.2f}x the first)"
            print(f"    {key:27s} {median:10,.0f}{ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps({"trees": [str(t) for t in trees], "loads": loads, "rounds": rounds},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Every detector on the same testbeds, prompts and seed: AUC, TPR@1%FPR, detection per copy count, cost, speed.

    python bench/detectors.py --model scanner/data/testbed --model DOSE_BUILD --json F --markdown T

A model's labels are its `groundtruth_labels.jsonl` when it has one (a planted prompt is memorized
only if its generations reproduced it: the dose build), else its `eval_prompts.jsonl`. Each
detector runs at its paper's defaults through `scanner.evaluate.evaluate`, as `memscan eval
--detector NAME` does; a detector a model refuses at its defaults is run with the adapted settings
of `ADAPTED` where there are some (NeMo's MS-SSIM on 8 x 8 latents), else reported refused.

Then the combination none of the papers has: for each pair of detectors, a logistic regression
on their two standardized scores, **cross-fitted** (the prompts split in two halves by position;
each half is scored by the model fitted on the other, labels included, so that no prompt scores
itself), summarized as every detector is (AUC, and TPR at the threshold `memscan calibrate`
fits for 1% FPR). Needs scikit-learn (the test extra).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scanner.detect import DetectSettings, Scanner
from scanner.detectors import DETECTORS, NemoSsimSettings, create_detector
from scanner.errors import MemscanError
from scanner.evaluate import evaluate, read_labelled_prompts, summarize
from scanner.model import load_model
from scanner.testbed.groundtruth import GROUNDTRUTH_LABELS
from scanner.threads import current_threads

# Settings for latents too small for a detector's defaults (docs/detectors.md): a 3 x 3 window, 2 scales.
ADAPTED = {"nemo-ssim": (NemoSsimSettings(sigma=0.3, betas=(0.33, 0.33)), "sigma 0.3, 2 scales")}
# Each paper's own figure on SD v1.4 (AUC / TPR@1%FPR), where it could be checked here; see docs/detectors.md.
PAPER_FIGURES = {
    "wen": "0.960 / 0.760 (first step, 1 generation)",
    "anisotropy": "not retrievable offline",
    "sail": "not retrievable offline",
    "attention-entropy": "not retrievable offline (345 memorized prompts, not 500)",
    "nemo-ssim": "no AUC published (flags SSIM > 0.428)",
}


def labels_of(model: Path) -> Path:
    """The model's labelled prompts: by generation where the build measured them, else as planted."""
    by_generation = model / GROUNDTRUTH_LABELS
    return by_generation if by_generation.is_file() else model / "eval_prompts.jsonl"


def run_detector(scanner: Scanner, rows: list[dict], name: str, batch_size: int) -> tuple[dict, np.ndarray]:
    """One detector's evaluation summary and scores, adapted (and saying so) where its defaults are refused."""
    try:
        evaluation = evaluate(scanner, rows, batch_size, detector=create_detector(name, scanner))
        adapted = None
    except MemscanError as refusal:
        if name not in ADAPTED:
            return {"refused": str(refusal)}, np.full(len(rows), np.nan)
        settings, adapted = ADAPTED[name]
        evaluation = evaluate(scanner, rows, batch_size, detector=create_detector(name, scanner, settings))
    return {**evaluation.summary, "adapted": adapted}, evaluation.scores


def cross_fitted_logistic(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Decision values of a logistic regression on standardized `features` [N, k], each half by the other half's fit."""
    from sklearn.linear_model import LogisticRegression

    combined = np.empty(len(labels))
    halves = np.arange(len(labels)) % 2
    for half in (0, 1):
        train, test = halves != half, halves == half
        mean, std = features[train].mean(axis=0), features[train].std(axis=0)
        fit = LogisticRegression(max_iter=1000).fit((features[train] - mean) / std, labels[train])
        combined[test] = fit.decision_function((features[test] - mean) / std)
    return combined


def combined_pairs(rows: list[dict], scores: dict[str, np.ndarray]) -> list[dict]:
    """For each pair of detectors, the summary of their cross-fitted logistic combination, best first."""
    labels = np.array([row["label"] for row in rows])
    usable = [name for name, s in scores.items() if np.isfinite(s).all()]
    out = []
    for a, b in itertools.combinations(usable, 2):
        summary = summarize(rows, cross_fitted_logistic(np.column_stack([scores[a], scores[b]]), labels))
        out.append({"detectors": [a, b], **{k: summary[k] for k in ("auc", "tpr_at_1pct_fpr")},
                    **({"detection_by_copies": summary["detection_by_copies"]} if "detection_by_copies" in summary else {})})
    return sorted(out, key=lambda r: (r["tpr_at_1pct_fpr"], r["auc"]), reverse=True)


def _copies_cell(summary: dict) -> str:
    by = summary.get("detection_by_copies")
    return " ".join(f"{k}:{v['detected']:.2f}" for k, v in by.items() if k != "threshold") if by else ""


def markdown(results: list[dict]) -> str:
    """One table of every model and detector, then each model's best combined pair."""
    lines = ["| model | detector | AUC | TPR@1%FPR | detected at 1% FPR, by copies | forwards / prompt | JVPs / prompt | prompts/s | paper, SD v1.4 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for name, s in result["detectors"].items():
            if "refused" in s:
                lines.append(f"| {result['name']} | {name} | refused: {s['refused']} | | | | | | {PAPER_FIGURES[name]} |")
                continue
            label = name + (f" ({s['adapted']})" if s["adapted"] else "")
            lines.append(f"| {result['name']} | {label} | {s['auc']:.3f} | {s['tpr_at_1pct_fpr']:.3f} | {_copies_cell(s)} | "
                         f"{s['forwards_per_prompt']} | {s['jvps_per_prompt']} | {s['prompts_per_second']:.0f} | "
                         f"{PAPER_FIGURES[name]} |")
        if result["combined"]:
            best = result["combined"][0]
            lines.append(f"| {result['name']} | logistic({best['detectors'][0]}, {best['detectors'][1]}), cross-fitted | "
                         f"{best['auc']:.3f} | {best['tpr_at_1pct_fpr']:.3f} | {_copies_cell(best)} | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="a testbed folder (repeat for several)")
    parser.add_argument("--detectors", default=",".join(DETECTORS), help="comma-separated (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as the docs' figures)")
    parser.add_argument("--json", help="write every summary here")
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for folder in map(Path, args.model):
        labels = labels_of(folder)
        rows = read_labelled_prompts(labels)
        scanner = Scanner(load_model(folder, device="cpu"), DetectSettings(seed=args.seed))
        summaries, scores = {}, {}
        for name in args.detectors.split(","):
            began = time.perf_counter()
            summaries[name], scores[name] = run_detector(scanner, rows, name, args.batch_size)
            print(f"{folder.name} {name}: {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
        results.append({"name": folder.name, "model": str(folder), "labels": str(labels),
                        "n_pos": sum(r["label"] for r in rows), "n_neg": sum(1 - r["label"] for r in rows),
                        "detectors": summaries, "combined": combined_pairs(rows, scores)})
    table = markdown(results)
    print(table)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "runtime": current_threads().record(), "seed": args.seed, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()

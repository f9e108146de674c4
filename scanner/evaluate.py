"""Score labelled prompts with the detector and report AUC, TPR@1%FPR, accuracy, per kind.

Used by `memscan eval` and `memscan demo`; the scoring is the one `Scanner` in
`scanner.detect`, so the figures are those of the detector users run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .detect import Scanner
from .errors import MemscanError
from .metrics import detection_metrics, roc_curve


@dataclass
class Evaluation:
    """Labelled prompts, their scores, and the summary written as JSON."""

    rows: list[dict]  # prompt, label, kind
    scores: np.ndarray
    summary: dict

    def top(self, n: int) -> list[tuple[dict, float]]:
        """The `n` highest-scoring rows with their scores."""
        order = np.argsort(-self.scores, kind="stable")[:n]
        return [(self.rows[i], float(self.scores[i])) for i in order]


def read_labelled_prompts(path: str | Path) -> list[dict]:
    """JSONL rows with `prompt`, `label` (1 memorized, 0 normal) and optionally `kind`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines: JSON may hold U+2028
    except OSError as exc:
        raise MemscanError(f"{path}: cannot be read ({exc.strerror})") from exc
    except UnicodeDecodeError:
        raise MemscanError(f"{path}: not UTF-8") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MemscanError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or row.get("label") not in (0, 1):
            raise MemscanError(f"{path}:{number}: each row needs 'prompt' (a string) and 'label' (0 or 1)")
        rows.append({"prompt": row["prompt"], "label": int(row["label"]), "kind": row.get("kind", "")})
    labels = {row["label"] for row in rows}
    if labels != {0, 1}:
        raise MemscanError(f"{path}: needs both memorized (1) and normal (0) prompts")
    return rows


def score_prompts(scanner: Scanner, prompts: list[str], batch_size: int = 256) -> np.ndarray:
    """Each prompt's memorization score, in input order."""
    return np.concatenate(
        [scanner.score(prompts[i : i + batch_size]).score for i in range(0, len(prompts), batch_size)]
    )


def summarize(rows: list[dict], scores: np.ndarray) -> dict:
    """Overall metrics and, per kind, its score statistics and the positives-against-that-kind metrics."""
    labels = np.array([row["label"] for row in rows])
    kinds = np.array([row["kind"] for row in rows])
    summary = detection_metrics(labels, scores)
    per_kind = {}
    for kind in dict.fromkeys(kinds.tolist()):
        mask = kinds == kind
        entry = {"n": int(mask.sum()), "label": int(labels[mask][0]), "mean_score": float(scores[mask].mean()),
                 "std_score": float(scores[mask].std())}
        if entry["label"] == 0:
            against = mask | (labels == 1)
            entry.update({f"{k}_vs_positives": v for k, v in detection_metrics(labels[against], scores[against]).items()
                          if k in ("auc", "tpr_at_1pct_fpr")})
        per_kind[kind] = entry
    summary["per_kind"] = per_kind
    summary["tpr_convention"] = "reference: tpr at the last ROC point with fpr < 0.01"
    return summary


def evaluate(scanner: Scanner, rows: list[dict], batch_size: int = 256) -> Evaluation:
    """Score the labelled prompts and summarize."""
    scores = score_prompts(scanner, [row["prompt"] for row in rows], batch_size)
    summary = summarize(rows, scores)
    summary["settings"] = {**scanner.settings.to_dict(), "engine": scanner.engine.name}
    return Evaluation(rows=rows, scores=scores, summary=summary)


def write_scores(evaluation: Evaluation, path: str | Path) -> None:
    """One JSON line per prompt: the labelled row plus its score."""
    with open(path, "w", encoding="utf-8") as f:
        for row, score in zip(evaluation.rows, evaluation.scores):
            f.write(json.dumps({**row, "score": float(score)}, ensure_ascii=False) + "\n")


def plot_evaluation(evaluation: Evaluation, path: str | Path) -> None:
    """ROC curve (1% FPR marked) and score histograms by label, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.array([row["label"] for row in evaluation.rows])
    fpr, tpr, _ = roc_curve(labels, evaluation.scores)
    s = evaluation.summary
    fig, (roc_ax, hist_ax) = plt.subplots(1, 2, figsize=(10, 4))
    roc_ax.plot(fpr, tpr, drawstyle="steps-post")
    roc_ax.plot([0, 1], [0, 1], ls=":", c="gray")
    roc_ax.axvline(0.01, ls="--", c="gray", lw=0.8)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate",
               title=f"ROC: AUC {s['auc']:.3f}, TPR@1%FPR {s['tpr_at_1pct_fpr']:.3f}")
    bins = np.linspace(evaluation.scores.min(), evaluation.scores.max(), 50)
    for label, name in ((0, "normal"), (1, "memorized")):
        hist_ax.hist(evaluation.scores[labels == label], bins=bins, alpha=0.6, label=f"{name} (n={int((labels == label).sum())})")
    hist_ax.set(xlabel="memorization score", ylabel="prompts", title="scores by label")
    hist_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

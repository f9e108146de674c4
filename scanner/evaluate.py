"""Score labelled prompts with the detector and report AUC, TPR@1%FPR, accuracy, per kind; plot them.

Used by `memscan eval` and `memscan demo`; the scoring is the one `Scanner` in
`scanner.detect`, so the figures are those of the detector users run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .detect import Scanner
from .detectors import Detector, create_detector
from .errors import MemscanError
from .metrics import detection_metrics, roc_curve
from .threads import current_threads


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
    """JSONL rows with `prompt`, `label` (1 memorized, 0 normal), optionally `kind` and `copies` (a dose build's)."""
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
        copies = row.get("copies")
        if copies is not None and (not isinstance(copies, int) or isinstance(copies, bool) or copies < 1):
            raise MemscanError(f"{path}:{number}: 'copies' must be a positive integer")
        rows.append({"prompt": row["prompt"], "label": int(row["label"]), "kind": row.get("kind", ""),
                     **({"copies": copies} if copies is not None else {})})
    labels = {row["label"] for row in rows}
    if labels != {0, 1}:
        raise MemscanError(f"{path}: needs both memorized (1) and normal (0) prompts")
    return rows


def score_prompts(
    score: Callable[[list[str]], np.ndarray], prompts: list[str], batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Each prompt's score by `score` (a batch of prompts -> `[B]`), in input order; `progress` gets the prompts done after each batch."""
    scores = []
    for start in range(0, len(prompts), batch_size):
        scores.append(score(prompts[start : start + batch_size]))
        if progress is not None:
            progress(len(scores[-1]))
    return np.concatenate(scores)


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
    if any("copies" in row for row in rows):
        summary["detection_by_copies"] = detection_by_copies(rows, scores)
    return summary


def detection_by_copies(rows: list[dict], scores: np.ndarray) -> dict:
    """Per training-copy count of a dose build: its prompts, how many are memorized, and the share flagged at the
    threshold `memscan calibrate` fits for 1% FPR on all the rows."""
    from .calibration import fit_threshold

    labels = np.array([row["label"] for row in rows])
    threshold = fit_threshold(labels, scores, 0.01)
    copies = np.array([row.get("copies", 0) for row in rows])
    result = {"threshold": threshold}
    for count in sorted(set(copies.tolist()) - {0}):
        mask = copies == count
        result[str(count)] = {"n": int(mask.sum()), "memorized": int(labels[mask].sum()),
                              "detected": float((scores[mask] >= threshold).mean())}
    return result


def evaluate(
    scanner: Scanner, rows: list[dict], batch_size: int = 256, progress: Callable[[int], None] | None = None,
    detector: Detector | None = None,
) -> Evaluation:
    """Score the labelled prompts with `detector` (default: Wen's, `scanner`'s own score) and summarize.

    The summary holds `auc`, `tpr_at_1pct_fpr` (Wen's rule), `tpr_closest_to_1pct_fpr` (the later
    papers'), `n_pos`, `n_neg`, the detector's name, settings and `forwards_per_prompt`, `seconds`, and the
    `runtime` its speed depends on (threads, load average).
    """
    detector = detector or create_detector("wen", scanner)
    start = time.perf_counter()
    scores = score_prompts(detector.score, [row["prompt"] for row in rows], batch_size, progress)
    seconds = time.perf_counter() - start
    summary = summarize(rows, scores)
    # SAIL, anisotropy and MemAttn report the ROC point closest to 1% FPR, not the last one under it.
    # Their `tpr[argmin(|fpr - 0.01|)]` takes the lowest of tied points (0 at a perfect separation,
    # from the (0, 0) point): the highest TPR at that FPR is the one a threshold achieves.
    fpr, tpr, _ = roc_curve(np.array([row["label"] for row in rows]), scores)
    distance = np.abs(fpr - 0.01)
    summary["tpr_closest_to_1pct_fpr"] = float(tpr[distance == distance.min()].max())
    described = detector.describe()
    summary.update(
        detector=described["detector"], detector_settings=described["settings"],
        forwards_per_prompt=described["forwards_per_prompt"], jvps_per_prompt=described["jvps_per_prompt"],
        seconds=seconds, prompts_per_second=len(rows) / seconds,
        settings={**scanner.settings.to_dict(), "engine": scanner.engine.name}, runtime=current_threads().record(),
    )
    return Evaluation(rows=rows, scores=scores, summary=summary)


def write_scores(evaluation: Evaluation, path: str | Path) -> None:
    """One JSON line per prompt: the labelled row plus its score."""
    with open(path, "w", encoding="utf-8") as f:
        for row, score in zip(evaluation.rows, evaluation.scores):
            f.write(json.dumps({**row, "score": float(score)}, ensure_ascii=False) + "\n")


def evaluation_figure(evaluation: Evaluation, threshold: float | None = None):
    """The ROC curve on a log FPR axis (1% FPR marked) beside the score histograms by label with the
    threshold: `threshold`, else the one `memscan calibrate` fits for 1% FPR on these prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from .calibration import fit_threshold

    labels = np.array([row["label"] for row in evaluation.rows])
    scores = evaluation.scores
    if threshold is None:
        threshold, source = fit_threshold(labels, scores, 0.01), "fitted for 1% FPR"
    else:
        source = "given"
    fpr, tpr, _ = roc_curve(labels, scores)
    s = evaluation.summary
    fig, (roc_ax, hist_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    # Log FPR: on a linear axis the whole region that matters (FPR <= 1%) is one pixel column.
    # FPR 0 has no place on it: those points sit at half the smallest non-zero FPR, the left edge.
    floor = 0.5 / max(1, int((labels == 0).sum()))
    roc_ax.plot(np.maximum(fpr, floor), tpr, drawstyle="steps-post", label="detector")
    chance = np.geomspace(floor, 1, 100)
    roc_ax.plot(chance, chance, ls=":", c="gray", label="chance")
    roc_ax.axvline(0.01, ls="--", c="crimson", lw=1, label="1% FPR")
    roc_ax.set_xscale("log")
    roc_ax.set_xlim(floor, 1)
    roc_ax.set_ylim(0, 1.02)
    roc_ax.xaxis.set_major_locator(LogLocator(base=10))
    roc_ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{100 * value:g}%"))
    roc_ax.xaxis.set_minor_formatter(NullFormatter())
    roc_ax.set(xlabel="false positive rate (log scale)", ylabel="true positive rate",
               title=f"ROC: AUC {s['auc']:.3f}, TPR@1%FPR {s['tpr_at_1pct_fpr']:.3f}")
    roc_ax.legend(loc="lower right", fontsize=8)
    bins = np.linspace(min(scores.min(), threshold), max(scores.max(), threshold), 50)
    for label, name in ((0, "normal"), (1, "memorized")):
        hist_ax.hist(scores[labels == label], bins=bins, alpha=0.6, label=f"{name} (n={int((labels == label).sum())})")
    flagged = scores >= threshold
    hist_ax.axvline(threshold, c="crimson", ls="--",
                    label=f"threshold {threshold:.3g} ({source})\nflags {int(flagged[labels == 1].sum())} memorized, "
                          f"{int(flagged[labels == 0].sum())} normal")
    hist_ax.set(xlabel="memorization score", ylabel="prompts", title="scores by label")
    hist_ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def plot_evaluation(evaluation: Evaluation, path: str | Path, threshold: float | None = None) -> None:
    """`evaluation_figure` as one image file (PNG, or any format matplotlib writes)."""
    import matplotlib.pyplot as plt

    fig = evaluation_figure(evaluation, threshold)
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Detection metrics with the reference implementation's conventions (see docs/method.md).

Own numpy code so the library needs no scikit-learn; tests check it against sklearn.
"""

from __future__ import annotations

import numpy as np

FPR_BUDGET = 0.01


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) as sklearn's `roc_curve` with its defaults, highest threshold first.

    Like sklearn, points in the middle of a straight run are dropped (`drop_intermediate`);
    this matters to TPR@1%FPR, which reads the last point under 1%.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # The last index of each run of equal scores: a threshold admits all ties at once.
    cuts = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(scores) - 1]
    true_pos = np.cumsum(sorted_labels)[cuts]
    false_pos = (cuts + 1) - true_pos
    thresholds = sorted_scores[cuts]
    if len(cuts) > 2:
        corners = np.r_[True, np.logical_or(np.diff(false_pos, 2), np.diff(true_pos, 2)), True]
        true_pos, false_pos, thresholds = true_pos[corners], false_pos[corners], thresholds[corners]
    tpr = np.r_[0.0, true_pos / max(1, labels.sum())]
    fpr = np.r_[0.0, false_pos / max(1, (~labels).sum())]
    return fpr, tpr, np.r_[np.inf, thresholds]


def detection_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC, TPR at the last ROC point with FPR < 1% (the reference's rule), best balanced accuracy."""
    fpr, tpr, _ = roc_curve(labels, scores)
    labels = np.asarray(labels).astype(bool)
    return {
        "auc": float(np.trapezoid(tpr, fpr)),
        "tpr_at_1pct_fpr": float(tpr[np.where(fpr < FPR_BUDGET)[0][-1]]),
        "acc": float(np.max(1 - (fpr + (1 - tpr)) / 2)),
        "n_pos": int(labels.sum()),
        "n_neg": int((~labels).sum()),
    }

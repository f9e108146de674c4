"""Calibration: the flagging threshold that meets a target false-positive rate on labelled prompts.

A prompt is flagged when `score >= threshold` (the rule of `--threshold` everywhere). The
threshold is only meaningful for the model and detection settings it was fitted with, so
a calibration records both and refuses to be applied to anything else.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__
from .errors import MemscanError
from .metrics import detection_metrics

if TYPE_CHECKING:
    from .detect import Scanner

FLAG_RULE = "flagged when score >= threshold"


@dataclass(frozen=True)
class Calibration:
    """A fitted threshold, what it achieved on the labelled prompts, and what it is valid for."""

    threshold: float
    target_fpr: float
    tpr: float  # achieved on the labelled prompts
    fpr: float  # achieved on the labelled prompts, <= target_fpr
    auc: float
    n_pos: int
    n_neg: int
    model: str  # fingerprint of the model that scored the labelled prompts
    settings: dict  # the settings record scan writes with every row
    labels: str  # the labelled prompts file, as given
    created: str  # ISO 8601, UTC
    memscan_version: str
    rule: str = FLAG_RULE
    normal_median: float | None = None  # median score of the normal prompts: what mitigation aims for

    def check(self, model: str, settings: dict) -> None:
        """Raise `MemscanError` unless this calibration was made for `model` and `settings`."""
        if model != self.model:
            raise MemscanError(
                f"calibration is for model {self.model}, not {model}; run memscan calibrate with this model"
            )
        if settings != self.settings:
            differing = sorted(k for k in self.settings.keys() | settings.keys() if self.settings.get(k) != settings.get(k))
            detail = ", ".join(f"{k} {self.settings.get(k)!r} vs {settings.get(k)!r}" for k in differing)
            raise MemscanError(f"calibration was made with other detection settings ({detail}); use those or recalibrate")

    def threshold_for(self, scanner: Scanner) -> float:
        """The threshold, once checked against the scanner's model fingerprint and settings record."""
        from .scan import scanner_settings

        self.check(scanner.model.fingerprint, scanner_settings(scanner))
        return self.threshold

    def save(self, path: str | Path) -> None:
        """Write as indented JSON."""
        try:
            Path(path).write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise MemscanError(f"cannot write {path}: {exc.strerror}") from exc


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration written by `Calibration.save`; a missing or malformed file is a `MemscanError`."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MemscanError(f"{path}: no such calibration file") from None
    except OSError as exc:
        raise MemscanError(f"{path}: cannot be read ({exc.strerror})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemscanError(f"{path}: not a calibration file (invalid JSON: {exc})") from exc
    names = {f.name for f in fields(Calibration)}
    missing = sorted(names - set(record)) if isinstance(record, dict) else sorted(names)
    if missing or not isinstance(record["settings"], dict):
        raise MemscanError(f"{path}: not a calibration file (missing or malformed: {', '.join(missing) or 'settings'})")
    return Calibration(**{k: record[k] for k in names})


def check_target_fpr(target_fpr: float) -> None:
    """Refuse a target false-positive rate outside [0, 1)."""
    if not 0.0 <= target_fpr < 1.0:
        raise MemscanError(f"target FPR must be in [0, 1), got {target_fpr}")


def fit_threshold(labels: np.ndarray, scores: np.ndarray, target_fpr: float) -> float:
    """The threshold with the highest TPR whose FPR is <= `target_fpr`, and the lowest FPR for that TPR."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    negatives = np.sort(scores[~labels])
    # Only positives' scores are worth considering: any threshold between two of them flags
    # the same positives as the next one up and at least as many negatives.
    candidates = np.unique(scores[labels])
    false_pos = len(negatives) - np.searchsorted(negatives, candidates, side="left")  # negatives >= candidate
    within = np.flatnonzero(false_pos / len(negatives) <= target_fpr)  # a suffix: false_pos falls as candidates rise
    if not len(within):
        return float(np.nextafter(scores.max(), math.inf))  # no positive can be flagged in budget: flag nothing
    lowest_flagged = candidates[within[0]]
    below = scores[scores < lowest_flagged]
    if not len(below):
        return float(lowest_flagged)
    # Halfway to the next score down: the same flags, but the boundary prompt stays flagged when
    # another batch size or device moves its score in the last digits.
    halfway = below.max() + (lowest_flagged - below.max()) / 2
    return float(halfway if halfway > below.max() else lowest_flagged)


def fit_calibration(
    labels: np.ndarray, scores: np.ndarray, target_fpr: float, *, model: str, settings: dict, labels_file: str = ""
) -> Calibration:
    """Fit the threshold for `target_fpr` on labelled scores (1 memorized, 0 normal) and record its provenance."""
    check_target_fpr(target_fpr)
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.all() or not labels.any():
        raise MemscanError("calibration needs both memorized (1) and normal (0) prompts")
    threshold = fit_threshold(labels, scores, target_fpr)
    flagged = scores >= threshold
    metrics = detection_metrics(labels, scores)
    return Calibration(
        threshold=threshold,
        target_fpr=target_fpr,
        tpr=float(flagged[labels].mean()),
        fpr=float(flagged[~labels].mean()),
        auc=metrics["auc"],
        n_pos=metrics["n_pos"],
        n_neg=metrics["n_neg"],
        model=model,
        settings=settings,
        labels=labels_file,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        memscan_version=__version__,
        normal_median=float(np.median(scores[~labels])),
    )

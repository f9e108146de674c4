"""Calibration: the flagging threshold that meets a target false-positive rate on labelled prompts.

A prompt is flagged when `score >= threshold` (the rule of `--threshold` everywhere). The
threshold is only meaningful for the model and detection settings it was fitted with, so
a calibration records both and refuses to be applied to anything else. The engine is not one of
them: every engine computes the same score within fp32 rounding (tests/test_engines.py, the plans'
tests), far inside any threshold's resolution, so that a calibration made with the torch engine
applies to a scan plan's scores (engine `onnx`) and back.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__
from .errors import MemscanError
from .metrics import detection_metrics

if TYPE_CHECKING:
    from .detect import Scanner

FLAG_RULE = "flagged when score >= threshold"
MODEL_CALIBRATION = "calibration.json"  # a model folder's own calibration, applied by default
# Settings record fields that say how a score was computed, not what it is: not compared.
NOT_COMPARED = ("engine",)


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

    def mismatch(self, model: str, settings: dict) -> str | None:
        """Why this calibration does not apply to `model` and `settings`; None when it does."""
        if model != self.model:
            return f"calibration is for model {self.model}, not {model}; run memscan calibrate with this model"
        differing = sorted(
            k for k in self.settings.keys() | settings.keys() if k not in NOT_COMPARED and self.settings.get(k) != settings.get(k)
        )
        if differing:
            detail = ", ".join(f"{k} {self.settings.get(k)!r} vs {settings.get(k)!r}" for k in differing)
            return f"calibration was made with other detection settings ({detail}); use those or recalibrate"
        return None

    def check(self, model: str, settings: dict) -> None:
        """Raise `MemscanError` unless this calibration was made for `model` and `settings`."""
        reason = self.mismatch(model, settings)
        if reason is not None:
            raise MemscanError(reason)

    def threshold_for(self, scanner: Scanner) -> float:
        """The threshold, once checked against the scanner's model fingerprint and settings record."""
        from .scan import scanner_settings

        return self.threshold_checked(scanner.model.fingerprint, scanner_settings(scanner))

    def threshold_checked(self, model: str, settings: dict) -> float:
        """The threshold, once checked against a model fingerprint and settings record."""
        self.check(model, settings)
        return self.threshold

    def save(self, path: str | Path) -> None:
        """Write as indented JSON."""
        try:
            Path(path).write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise MemscanError(f"cannot write {path}: {exc.strerror}") from exc


def format_threshold(threshold: float) -> str:
    """A threshold for people: 3 significant digits (the fitted value sits halfway between two scores)."""
    return f"{threshold:.3g}"


@dataclass(frozen=True)
class Threshold:
    """The flagging threshold a command uses (None: no verdict) and where it came from, for people."""

    value: float | None
    source: str | None = None  # "--threshold", "calibration FILE", "the model's calibration FILE"
    calibration: str | None = None  # the calibration file it came from, if one

    def describe(self) -> str:
        """`threshold 0.628 from the model's calibration DIR/calibration.json`, or `no threshold`."""
        if self.value is None:
            return "no threshold"
        return f"threshold {format_threshold(self.value)}" + (f" from {self.source}" if self.source else "")


def model_calibration(model_path: str | Path) -> Path | None:
    """The calibration a model folder ships (`MODEL_CALIBRATION` inside it), if there is one."""
    path = Path(model_path) / MODEL_CALIBRATION
    return path if path.is_file() else None


def choose_threshold(
    model: str, settings: dict, *, threshold: float | None = None, calibration: Calibration | None = None,
    calibration_file: str | None = None, model_path: str | Path | None = None, use_model_calibration: bool = True,
    warn: Callable[[str], None] | None = None,
) -> Threshold:
    """The threshold for a scanner with fingerprint `model` and settings record `settings`.

    In order: `threshold`; `calibration` (read from `calibration_file`; refused, `MemscanError`, when it does
    not apply); the model folder's own calibration, when `use_model_calibration` and it applies (when it does
    not, `warn` gets one line and there is no verdict: the user asked for nothing, so nothing is refused).
    """
    if threshold is not None:
        return Threshold(threshold, "--threshold")
    if calibration is not None:
        checked = calibration.threshold_checked(model, settings)
        return Threshold(checked, f"calibration {calibration_file}", calibration_file)
    own = model_calibration(model_path) if use_model_calibration and model_path is not None else None
    if own is None:
        return Threshold(None)
    shipped = load_calibration(own)
    reason = shipped.mismatch(model, settings)
    if reason is None:
        return Threshold(shipped.threshold, f"the model's calibration {own}", str(own))
    if warn is not None:
        warn(f"the model's {own} does not apply ({reason}): scoring without a verdict (--no-calibration silences this)")
    return Threshold(None)


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

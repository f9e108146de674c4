"""The metric code against scikit-learn on fresh random data."""

import numpy as np
import pytest
from sklearn.metrics import auc, roc_curve

from scanner.metrics import detection_metrics
from scanner.metrics import roc_curve as own_roc_curve


@pytest.mark.parametrize("ties", [False, True])
def test_detection_metrics_match_sklearn(ties):
    rng = np.random.default_rng()
    for _ in range(200):
        n = int(rng.integers(20, 600))
        labels = rng.integers(0, 2, size=n)
        labels[:2] = [0, 1]
        scores = rng.normal(size=n) + rng.uniform(0, 3) * labels
        if ties:
            scores = np.round(scores, 1)
        fpr, tpr, thresholds = roc_curve(labels, scores)
        ours = own_roc_curve(labels, scores)
        for a, b in zip(ours, (fpr, tpr, thresholds)):
            np.testing.assert_allclose(a, b)
        expected = {
            "auc": auc(fpr, tpr),
            "tpr_at_1pct_fpr": tpr[np.where(fpr < 0.01)[0][-1]],
            "acc": np.max(1 - (fpr + (1 - tpr)) / 2),
        }
        got = detection_metrics(labels, scores)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), key
        assert (got["n_pos"], got["n_neg"]) == (labels.sum(), n - labels.sum())

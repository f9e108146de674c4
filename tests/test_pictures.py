"""Pictures people can see: enlarged, labelled image grids; the ROC plot on a log FPR axis with the
threshold on the histogram; the sweep report's histogram with plain log-axis labels and the new
prompts as their own series. No model: these run in the default suite in about a second."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from scanner.calibration import fit_threshold
from scanner.evaluate import Evaluation, evaluation_figure, plot_evaluation, summarize
from scanner.generate import DISPLAY_SIDE, GUTTER, HEADER_HEIGHT, LABEL_WIDTH, image_grid, labelled_grid, upscale
from scanner.sweep.report import histogram_figure


def _images(count: int, height: int = 16, width: int = 16) -> np.ndarray:
    return np.random.default_rng().integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def test_upscale_is_nearest_neighbour_to_at_least_256_on_the_short_side():
    (image,) = _images(1)
    big = upscale(image)
    assert big.shape == (256, 256, 3)
    # Every source pixel is one uniform 16 x 16 block of exactly its colour.
    assert np.array_equal(big[::16, ::16], image)
    assert np.array_equal(big.reshape(16, 16, 16, 16, 3).min(axis=(1, 3)), image)
    assert np.array_equal(big.reshape(16, 16, 16, 16, 3).max(axis=(1, 3)), image)
    # The raw 70 x 34 mitigation grid (2 rows x 4 seeds): short side 34, a whole factor of 8 -> 272.
    grid = upscale(image_grid([_images(4), _images(4)]))
    assert grid.shape == (34 * 8, 70 * 8, 3)


def test_labelled_grid_places_enlarged_tiles_under_their_labels():
    before, after = _images(2), _images(2)
    grid = labelled_grid([before, after], ["before\nscore 0.8123", "after\nscore 0.1900"], ["seed 0", "seed 7"])
    side = DISPLAY_SIDE
    assert grid.shape == (HEADER_HEIGHT + 2 * side + GUTTER, LABEL_WIDTH + 2 * side + GUTTER, 3)
    for r, images in enumerate((before, after)):
        for c, image in enumerate(images):
            top, left = HEADER_HEIGHT + r * (side + GUTTER), LABEL_WIDTH + c * (side + GUTTER)
            assert np.array_equal(grid[top : top + side, left : left + side], upscale(image)), (r, c)
        # The row label is drawn (dark text) in the label column beside its row, on white.
        label = grid[HEADER_HEIGHT + r * (side + GUTTER) : HEADER_HEIGHT + (r + 1) * side, :LABEL_WIDTH]
        assert (label.max(axis=2) < 100).sum() > 50 and label.max() == 255
    for c in range(2):  # each column's seed label above its tile
        header = grid[:HEADER_HEIGHT, LABEL_WIDTH + c * (side + GUTTER) : LABEL_WIDTH + c * (side + GUTTER) + side]
        assert (header.max(axis=2) < 100).sum() > 20


def _evaluation(n_neg: int = 300, n_pos: int = 30) -> Evaluation:
    rng = np.random.default_rng()
    rows = [{"prompt": f"n{i}", "label": 0, "kind": "normal"} for i in range(n_neg)]
    rows += [{"prompt": f"p{i}", "label": 1, "kind": "planted"} for i in range(n_pos)]
    scores = np.r_[rng.normal(0.2, 0.1, n_neg), rng.normal(0.7, 0.15, n_pos)]
    return Evaluation(rows, scores, summarize(rows, scores))


def test_roc_plot_has_a_log_fpr_axis_and_the_threshold_on_the_histogram(tmp_path):
    import matplotlib.pyplot as plt

    evaluation = _evaluation()
    fig = evaluation_figure(evaluation)
    fig.canvas.draw()
    roc_ax, hist_ax = fig.axes
    assert roc_ax.get_xscale() == "log"
    low, high = roc_ax.get_xlim()
    assert low == pytest.approx(0.5 / 300) and high == 1  # the 1%-FPR region spans a third of the axis
    ticks = [t.get_text() for t in roc_ax.get_xticklabels() if low <= t.get_position()[0] <= high]
    assert ticks == ["1%", "10%", "100%"]
    assert [line.get_xdata()[0] for line in roc_ax.get_lines() if line.get_label() == "1% FPR"] == [0.01]
    labels = np.array([row["label"] for row in evaluation.rows])
    threshold = fit_threshold(labels, evaluation.scores, 0.01)
    (line,) = [line for line in hist_ax.get_lines() if line.get_label().startswith("threshold")]
    assert line.get_xdata()[0] == threshold
    flagged = evaluation.scores >= threshold
    assert f"flags {flagged[labels == 1].sum()} memorized, {flagged[labels == 0].sum()} normal" in line.get_label()
    # The two histograms hold every prompt once.
    assert sum(patch.get_height() for patch in hist_ax.patches) == len(evaluation.rows)
    plt.close(fig)
    given = evaluation_figure(evaluation, threshold=0.5)
    assert any(line.get_xdata()[0] == 0.5 and "(given)" in line.get_label() for line in given.axes[1].get_lines())
    plt.close(given)
    plot_evaluation(evaluation, tmp_path / "roc.png")
    from PIL import Image

    assert Image.open(tmp_path / "roc.png").size == (1100, 420)


class _Store:
    """The two queries of `SweepStore` the histogram makes, over scores held in memory."""

    def __init__(self, stored: np.ndarray, new: np.ndarray):
        self.scores = {"config": stored, "sweep": new}

    def score_range(self, by: str, value: int) -> tuple[float, float]:
        return float(self.scores["config"].min()), float(self.scores["config"].max())

    def histogram(self, by: str, value: int, low: float, high: float, bins: int) -> list[int]:
        counts, _ = np.histogram(self.scores[by], bins=bins, range=(low, high))
        return counts.tolist()


def test_sweep_histogram_has_plain_log_labels_and_the_new_prompts_as_a_series():
    import matplotlib.pyplot as plt

    rng = np.random.default_rng()
    new = rng.normal(0.3, 0.1, 40)
    stored = np.r_[rng.normal(0.3, 0.1, 5000), new]
    fig = histogram_figure(_Store(stored, new), SimpleNamespace(config=1, sweep=2, threshold=0.6))
    fig.canvas.draw()
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    shown = [t.get_text() for t in ax.get_yticklabels() if low <= t.get_position()[1] <= high]
    # Plain numbers at every power of ten in view (the tallest bin holds hundreds), not 10^2 or 6x10^0.
    assert high > 100 and shown == [f"{10**k:,}" for k in range(int(np.log10(high)) + 1)]
    assert all(not t.get_text() for t in ax.get_yticklabels(minor=True))
    stored_bars, new_bars = ax.containers
    assert stored_bars.get_label().startswith("all stored (5040)") and new_bars.get_label().startswith("new in this sweep (40)")
    # Bars start at 0.5 (under a count of 1): a bin's count is its height plus 0.5.
    for bars, total in ((stored_bars, 5040), (new_bars, 40)):
        heights = np.array([patch.get_height() for patch in bars])
        assert (heights[heights > 0] + 0.5).sum() == total
    assert stored_bars[0].get_facecolor() != new_bars[0].get_facecolor()
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [0.6]
    plt.close(fig)

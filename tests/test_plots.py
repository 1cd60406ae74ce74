"""Plots render headless (Agg) and write non-empty PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leukray import CLASSES
from leukray import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_MAGIC


def test_backend_is_agg() -> None:
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"


def test_plot_curves(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5 + 0.1 * e,
         "val_accuracy": 0.45 + 0.1 * e}
        for e in range(1, 5)
    ]
    history[-1]["val_loss"] = None  # a partial row must not break the plot
    out = tmp_path / "sub" / "curves.png"
    plots.plot_curves(history, str(out))
    _assert_png(out)


def test_plot_confusion_matrix(tmp_path: Path) -> None:
    cm = [[5, 1, 0, 0], [0, 7, 2, 0], [0, 1, 6, 1], [0, 0, 0, 9]]
    out = tmp_path / "cm.png"
    plots.plot_confusion_matrix(cm, CLASSES, str(out), title="test split")
    _assert_png(out)
    out2 = tmp_path / "cm_np.png"
    plots.plot_confusion_matrix(np.zeros((4, 4), dtype=int), CLASSES, str(out2))
    _assert_png(out2)


def test_plot_reliability(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4)) * 2
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 4, size=200)
    out = tmp_path / "rel.png"
    plots.plot_reliability(y, prob, str(out), n_bins=10)
    _assert_png(out)


def test_plot_sample_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    true_idx = rng.integers(0, 4, size=10)
    pred_idx = true_idx.copy()
    pred_idx[::3] = (pred_idx[::3] + 1) % 4
    out = tmp_path / "grid.png"
    plots.plot_sample_grid(images, true_idx, pred_idx, CLASSES, str(out), n=7)
    _assert_png(out)

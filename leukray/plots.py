"""Report figures: training curves, confusion matrix, reliability diagram, sample predictions.

Figures are rendered with the Agg backend (set here, before anything imports pyplot) because training and
evaluation run headless in Ray workers. Each function builds its own `Figure` object instead of using pyplot's
global figure registry, so concurrent Tune trials in one process neither share state nor leak figures.
Paths are local files (callers upload them to object storage afterwards), except the drift report's class-mix
figure, which is written where the user points it (a local file or s3://).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from leukray import storage  # noqa: E402
from leukray.config import StorageOptions  # noqa: E402
from leukray.metrics import reliability_bins  # noqa: E402

__all__ = ["plot_curves", "plot_confusion_matrix", "plot_reliability", "plot_sample_grid", "plot_ood_scores",
           "plot_class_mix"]

_OK_COLOR = "#1a7f37"
_ERR_COLOR = "#d1242f"


def _save(fig: Figure, path: str) -> None:
    """Write a PNG, creating the parent folder so callers can point at a fresh run directory."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _column(history: Sequence[Mapping[str, object]], key: str) -> np.ndarray:
    """A history column as floats; a missing or None value becomes NaN so the line just has a gap."""
    values = []
    for row in history:
        value = row.get(key)
        values.append(float("nan") if value is None else float(value))  # type: ignore[arg-type]
    return np.asarray(values, dtype=float)


def plot_curves(history: list[dict], path: str) -> None:
    """Loss and accuracy per epoch, train vs validation, as two side-by-side panels.

    `history` rows carry epoch, train_loss, val_loss, train_accuracy, val_accuracy (the study's curves);
    missing values leave gaps rather than failing, since a crashed or partial run is exactly when the
    curves are needed.
    """
    if not history:
        raise ValueError("plot_curves: history is empty, nothing to plot")
    epochs = _column(history, "epoch")
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, metric, label in ((ax_loss, "loss", "Loss"), (ax_acc, "accuracy", "Accuracy")):
        for split, style in (("train", "o-"), ("val", "s--")):
            ax.plot(epochs, _column(history, f"{split}_{metric}"), style, markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_acc.set_ylim(0.0, 1.02)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion_matrix(
    cm: list[list[int]] | np.ndarray, classes: Sequence[str], path: str, title: str = ""
) -> None:
    """Confusion matrix heat map (rows true, columns predicted) with the raw counts written in each cell.

    Counts rather than row-normalised rates are shown because the test sets are small and a "50%" cell
    may be one image.
    """
    matrix = np.asarray(cm, dtype=np.int64)
    n = len(classes)
    if matrix.shape != (n, n):
        raise ValueError(f"plot_confusion_matrix: matrix shape {matrix.shape} does not match {n} classes")
    fig = Figure(figsize=(1.3 * n + 2.5, 1.3 * n + 1.5))
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=list(classes), rotation=30, ha="right")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "Confusion matrix")
    threshold = matrix.max() / 2.0 if matrix.size and matrix.max() > 0 else 0.5
    for i in range(n):
        for j in range(n):
            ax.text(
                j, i, str(int(matrix[i, j])), ha="center", va="center",
                color="white" if matrix[i, j] > threshold else "black",
            )
    fig.tight_layout()
    _save(fig, path)


def plot_reliability(y_true: np.ndarray, y_prob: np.ndarray, path: str, n_bins: int = 15) -> None:
    """Reliability diagram (accuracy vs confidence per equal-width bin) with the ECE in the title.

    A second panel shows how many samples fall in each bin, since an off-diagonal bar backed by two images
    means little. Uses the same binning as `leukray.metrics.expected_calibration_error`.
    """
    bins = reliability_bins(y_true, y_prob, n_bins=n_bins)
    edges = np.asarray(bins["edges"])
    centers = (edges[:-1] + edges[1:]) / 2.0
    width = 1.0 / n_bins
    counts = np.asarray(bins["count"], dtype=float)
    acc = np.asarray([np.nan if a is None else a for a in bins["accuracy"]], dtype=float)
    conf = np.asarray([np.nan if c is None else c for c in bins["confidence"]], dtype=float)
    filled = counts > 0

    fig = Figure(figsize=(5, 6))
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.bar(centers[filled], acc[filled], width=width, edgecolor="black", color="#4c72b0", label="accuracy")
    gap_bottom = np.minimum(acc, conf)[filled]
    gap_height = np.abs(acc - conf)[filled]
    ax.bar(centers[filled], gap_height, bottom=gap_bottom, width=width, color=_ERR_COLOR, alpha=0.3,
           edgecolor=_ERR_COLOR, hatch="//", label="gap to confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE = {bins['ece']:.4f}, n = {int(counts.sum())})")
    ax.legend(loc="upper left")
    ax_count.bar(centers, counts, width=width, edgecolor="black", color="#999999")
    ax_count.set_xlabel("confidence (max probability)")
    ax_count.set_ylabel("count")
    fig.tight_layout()
    _save(fig, path)


def plot_sample_grid(
    images_uint8_nhwc: np.ndarray,
    true_idx: Sequence[int] | np.ndarray,
    pred_idx: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    path: str,
    n: int = 16,
) -> None:
    """The first `n` images with actual vs predicted labels; mistakes are titled in red.

    Lets a reviewer eyeball what the model confuses (the study's sample-prediction figure).
    Images are uint8 RGB NHWC, as `leukray.images.decode_image` returns them.
    """
    images = np.asarray(images_uint8_nhwc)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"plot_sample_grid: expected uint8 NHWC images, got shape {images.shape}")
    true_arr = np.asarray(true_idx, dtype=int)
    pred_arr = np.asarray(pred_idx, dtype=int)
    if not (len(true_arr) == len(pred_arr) == len(images)):
        raise ValueError(
            f"plot_sample_grid: {len(images)} images but {len(true_arr)} true and {len(pred_arr)} predicted labels"
        )
    count = min(int(n), len(images))
    if count <= 0:
        raise ValueError("plot_sample_grid: no images to plot")
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(2.4 * cols, 2.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for k, ax in enumerate(axes):
        ax.axis("off")
        if k >= count:
            continue
        img = images[k]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        wrong = true_arr[k] != pred_arr[k]
        ax.set_title(
            f"actual: {classes[true_arr[k]]}\npred: {classes[pred_arr[k]]}",
            fontsize=9, color=_ERR_COLOR if wrong else _OK_COLOR,
        )
    n_wrong = int((true_arr[:count] != pred_arr[:count]).sum())
    fig.suptitle(f"Actual vs predicted ({n_wrong} of {count} wrong, in red)")
    fig.tight_layout()
    _save(fig, path)


def plot_ood_scores(scores: Mapping[str, Mapping[str, np.ndarray]], thresholds: Mapping[str, float], path: str,
                    methods: Sequence[str] = ("knn", "msp")) -> None:
    """Histograms of out-of-distribution scores, one panel per method: the in-distribution split and each
    folder, with the package's threshold as a vertical line (right of it = flagged)."""
    fig = Figure(figsize=(5.5 * len(methods), 4))
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
        groups = {name: np.asarray(s[method], dtype=float) for name, s in scores.items()}
        finite = np.concatenate([g[np.isfinite(g)] for g in groups.values()])
        edges = np.linspace(finite.min(), finite.max(), 50) if len(finite) else np.linspace(0, 1, 50)
        for name, g in groups.items():
            ax.hist(g, bins=edges, alpha=0.5, density=True, label=f"{os.path.basename(name.rstrip('/')) or name} (n={len(g)})")
        ax.axvline(thresholds[method], color="black", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(f"{method} score (higher = further from training)")
        ax.set_xlabel("score")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_class_mix(drift_table, path: str, storage_options: StorageOptions | None = None) -> str:
    """Stacked bars of the class proportions per day (from `Results.drift`), the training mix as the first bar(s),
    each day's TV distance and shift above its bar.
    Written as PNG to `path`: a local file (parent folders created) or an s3:// URI (written with `storage_options`).
    """
    names = drift_table.schema.names
    classes = names[names.index("n") + 1:names.index("tv_distance")]  # the class columns sit between these
    rows = drift_table.to_pylist()
    if not rows:
        raise ValueError("nothing to plot: no scored days in the selected range")
    multi_model = len({r["model"] for r in rows}) > 1
    labels = []
    for r in rows:
        version = str(r["model"]).rsplit(":", 1)[-1]
        if r["source"] == "training":
            labels.append(f"training\n{version}")
        else:
            labels.append(f"{r['run_date']}\n" + (f"{version} " if multi_model else "") + f"n={r['n']}")
    n_train = sum(r["source"] == "training" for r in rows)
    fig = Figure(figsize=(max(6.0, 0.9 * len(rows) + 2.5), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    xs = [i + (0.5 if i >= n_train else 0.0) for i in range(len(rows))]  # a gap after the training bar(s)
    if 0 < n_train < len(rows):
        ax.axvline(n_train - 0.25, color="grey", linestyle=":", linewidth=1)
    bottom = [0.0] * len(rows)
    cmap = matplotlib.colormaps["tab10"]
    for i, c in enumerate(classes):
        vals = [r[c] or 0.0 for r in rows]
        ax.bar(xs, vals, bottom=bottom, label=c, color=cmap(i % 10),
               edgecolor=["black" if r["source"] == "training" else "none" for r in rows])
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, r in zip(xs, rows):
        if r["tv_distance"] is not None:
            shift = r.get("shift")
            ax.text(x, 1.01, f"TV {r['tv_distance']:.2f}" + ("" if shift is None else f"\nshift {shift:.2f}"),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs)
    many = len(rows) > 10
    ax.set_xticklabels(labels, rotation=45 if many else 0, ha="right" if many else "center", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("proportion of ok predictions")
    ax.set_title("Predicted class mix per day vs training distribution")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if storage.is_remote(path):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        storage.write_bytes(path, buf.getvalue(), storage_options)
        return path
    _save(fig, path)
    return path

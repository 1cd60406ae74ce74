"""Classification metrics for evaluation reports and model cards, built on scikit-learn.

Everything returned is plain JSON (floats, ints, lists, None) so it can go straight into `model_card.json`
and the evaluation report. Metrics that are undefined for a batch (ROC AUC for a class with no samples,
specificity without benign samples) are None instead of raising, because evaluation of small or skewed
batches must still produce a report. Class index 0 (`Benign`) is the only non-malignant class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

__all__ = [
    "classification_metrics",
    "expected_calibration_error",
    "reliability_bins",
    "review_tradeoff",
]

BENIGN_INDEX = 0
"""Index of the only non-malignant class in `leukray.CLASSES`."""


def _validate(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coerce to (N,) int and (N, C) float and name the problem clearly if shapes disagree."""
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.ndim != 2:
        raise ValueError(f"y_prob must be (N, C), got shape {y_prob.shape}")
    if y_prob.shape[0] != y_true.shape[0]:
        raise ValueError(f"y_true has {y_true.shape[0]} samples but y_prob has {y_prob.shape[0]}")
    if y_true.shape[0] == 0:
        raise ValueError("no samples: metrics are undefined for an empty batch")
    n_classes = y_prob.shape[1]
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(f"y_true labels must be in [0, {n_classes - 1}], got range [{y_true.min()}, {y_true.max()}]")
    return y_true, y_prob


def reliability_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15) -> dict:
    """Per-bin confidence/accuracy/count for equal-width confidence bins, plus the resulting ECE.

    Confidence is the max probability and correctness is argmax == label (Guo et al. 2017). Bins are
    right-closed, (k/n_bins, (k+1)/n_bins], with a confidence of exactly 0 going to the first bin.
    Shared by `expected_calibration_error` and the reliability diagram so the plotted ECE is the reported one.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y_true, y_prob = _validate(y_true, y_prob)
    confidence = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_index = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(bin_index, minlength=n_bins)
    conf_sum = np.bincount(bin_index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bin_index, weights=correct, minlength=n_bins)
    n = float(len(y_true))
    ece = float(np.abs(acc_sum - conf_sum).sum() / n)  # sum_b |B_b|/n * |acc_b - conf_b|
    return {
        "edges": edges.tolist(),
        "count": count.astype(int).tolist(),
        "accuracy": [float(a / c) if c else None for a, c in zip(acc_sum, count)],
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count)],
        "ece": ece,
    }


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: sample-weighted mean |accuracy - confidence| over equal-width bins.

    Reported next to accuracy because `confidence` drives the needs_review flag: a model that is right
    but over-confident would flag too few images.
    """
    return float(reliability_bins(y_true, y_prob, n_bins=n_bins)["ece"])


def _prf(y_true: np.ndarray, y_pred: np.ndarray, labels: list[int], average: str) -> dict:
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=average, zero_division=0
    )
    return {"precision": float(p), "recall": float(r), "f1": float(f)}


def _safe_recall(mask: np.ndarray, hit: np.ndarray) -> float | None:
    """Fraction of `mask` samples that are `hit`; None when the group is absent (undefined, not zero)."""
    total = int(mask.sum())
    return float((hit & mask).sum() / total) if total else None


def classification_metrics(y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str]) -> dict:
    """All evaluation metrics for one split, as a JSON-able dict.

    y_true: (N,) int class indices; y_prob: (N, C) probabilities (calibrated if the caller calibrated);
    classes: the C class names in output order. Predictions are argmax(y_prob). Keys: n, accuracy,
    macro/weighted {precision, recall, f1}, per_class {name: {precision, recall, f1, support}},
    confusion_matrix (rows true, cols predicted), roc_auc_ovr {name: auc or None, "macro": mean of the defined
    per-class AUCs or None}, ece, benign_vs_malignant {sensitivity, specificity}, nll.
    """
    y_true, y_prob = _validate(y_true, y_prob)
    n_classes = y_prob.shape[1]
    if len(classes) != n_classes:
        raise ValueError(f"{len(classes)} class names but y_prob has {n_classes} columns")
    labels = list(range(n_classes))
    y_pred = y_prob.argmax(axis=1)

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
        }
        for k, name in enumerate(classes)
    }

    # One-vs-rest AUC per class: undefined (None) unless the class has both positives and negatives,
    # so a small batch missing a class still gets a report. Macro = unweighted mean of the defined ones,
    # which is what sklearn's multi_class="ovr", average="macro" computes when every class is present.
    roc: dict[str, float | None] = {}
    for k, name in enumerate(classes):
        positives = y_true == k
        if positives.any() and not positives.all():
            roc[name] = float(roc_auc_score(positives.astype(int), y_prob[:, k]))
        else:
            roc[name] = None
    defined = [v for v in roc.values() if v is not None]
    roc["macro"] = float(np.mean(defined)) if defined else None

    benign_true = y_true == BENIGN_INDEX
    benign_pred = y_pred == BENIGN_INDEX

    # log_loss normalises rows that do not sum to one; clip so a hard 0 on the true class stays finite.
    nll = float(log_loss(y_true, np.clip(y_prob, 1e-15, 1.0), labels=labels))

    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro": _prf(y_true, y_pred, labels, "macro"),
        "weighted": _prf(y_true, y_pred, labels, "weighted"),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).astype(int).tolist(),
        "roc_auc_ovr": roc,
        "ece": expected_calibration_error(y_true, y_prob),
        "benign_vs_malignant": {
            # malignant recall: malignant images predicted as any malignant class
            "sensitivity": _safe_recall(~benign_true, ~benign_pred),
            # benign recall: benign images predicted benign
            "specificity": _safe_recall(benign_true, benign_pred),
        },
        "nll": nll,
    }


def review_tradeoff(y_true: np.ndarray, y_prob: np.ndarray, thresholds: Sequence[float]) -> list[dict]:
    """For each confidence threshold: what fraction of images needs_review flags, and what fraction of errors.

    An image is flagged when its confidence (max probability) < threshold, matching the scorer's
    needs_review column. Each row: threshold, flagged_fraction, errors_caught_fraction (None when there are
    no errors), accepted_accuracy (accuracy on unflagged images, None when all are flagged), n_flagged,
    n_errors, n_errors_caught.
    """
    y_true, y_prob = _validate(y_true, y_prob)
    confidence = y_prob.max(axis=1)
    errors = y_prob.argmax(axis=1) != y_true
    n = len(y_true)
    n_errors = int(errors.sum())
    rows = []
    for threshold in thresholds:
        t = float(threshold)
        if math.isnan(t):
            raise ValueError("review_tradeoff: threshold is NaN")
        flagged = confidence < t
        n_flagged = int(flagged.sum())
        caught = int((flagged & errors).sum())
        accepted = ~flagged
        n_accepted = int(accepted.sum())
        rows.append(
            {
                "threshold": t,
                "flagged_fraction": n_flagged / n,
                "errors_caught_fraction": caught / n_errors if n_errors else None,
                "accepted_accuracy": float((~errors & accepted).sum() / n_accepted) if n_accepted else None,
                "n_flagged": n_flagged,
                "n_errors": n_errors,
                "n_errors_caught": caught,
            }
        )
    return rows

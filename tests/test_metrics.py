"""Metrics against small cases whose expected values are worked out by hand in the comments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from leukray import CLASSES
from leukray.metrics import (
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
    review_tradeoff,
)

# 6 samples, 3 classes (index 0 = benign).
#   idx  true  probs               pred  conf  correct
#   0    0     [0.70, 0.20, 0.10]  0     0.70  yes
#   1    0     [0.30, 0.60, 0.10]  1     0.60  no
#   2    1     [0.10, 0.80, 0.10]  1     0.80  yes
#   3    1     [0.20, 0.55, 0.25]  1     0.55  yes
#   4    2     [0.05, 0.05, 0.90]  2     0.90  yes
#   5    2     [0.40, 0.35, 0.25]  0     0.40  no
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PROB = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.30, 0.60, 0.10],
        [0.10, 0.80, 0.10],
        [0.20, 0.55, 0.25],
        [0.05, 0.05, 0.90],
        [0.40, 0.35, 0.25],
    ]
)
NAMES = ("Benign", "A", "B")


def test_hand_computed_precision_recall_f1() -> None:
    m = classification_metrics(Y_TRUE, Y_PROB, NAMES)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class 0: predicted at idx 0,5 (1 right) -> P 1/2; true at 0,1 (1 found) -> R 1/2; F1 1/2
    # class 1: predicted at idx 1,2,3 (2 right) -> P 2/3; R 2/2; F1 = 2*(2/3)/(5/3) = 0.8
    # class 2: predicted at idx 4 (right) -> P 1; R 1/2; F1 = 2*0.5/1.5 = 2/3
    expected = {
        "Benign": (1 / 2, 1 / 2, 1 / 2, 2),
        "A": (2 / 3, 1.0, 0.8, 2),
        "B": (1.0, 1 / 2, 2 / 3, 2),
    }
    for name, (p, r, f, s) in expected.items():
        pc = m["per_class"][name]
        assert pc["precision"] == pytest.approx(p)
        assert pc["recall"] == pytest.approx(r)
        assert pc["f1"] == pytest.approx(f)
        assert pc["support"] == s
    # macro: P (1/2 + 2/3 + 1)/3 = 13/18; R (1/2 + 1 + 1/2)/3 = 2/3; F1 (1/2 + 4/5 + 2/3)/3 = 59/90
    assert m["macro"]["precision"] == pytest.approx(13 / 18)
    assert m["macro"]["recall"] == pytest.approx(2 / 3)
    assert m["macro"]["f1"] == pytest.approx(59 / 90)
    # equal supports -> weighted == macro
    for key in ("precision", "recall", "f1"):
        assert m["weighted"][key] == pytest.approx(m["macro"][key])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_weighted_average_uses_support() -> None:
    # true [0,0,0,1], pred [0,0,1,1]: class0 P 1 R 2/3 F1 0.8 (support 3); class1 P 1/2 R 1 F1 2/3 (support 1)
    y = np.array([0, 0, 0, 1])
    prob = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    m = classification_metrics(y, prob, ("Benign", "M"))
    assert m["weighted"]["precision"] == pytest.approx((3 * 1 + 1 * 0.5) / 4)
    assert m["weighted"]["recall"] == pytest.approx((3 * 2 / 3 + 1 * 1) / 4)
    assert m["weighted"]["f1"] == pytest.approx((3 * 0.8 + 1 * 2 / 3) / 4)


def test_sensitivity_specificity() -> None:
    m = classification_metrics(Y_TRUE, Y_PROB, NAMES)
    # malignant (true 1 or 2) at idx 2,3,4,5 -> predicted non-benign at 2,3,4 -> 3/4
    # benign at idx 0,1 -> predicted benign at 0 -> 1/2
    assert m["benign_vs_malignant"]["sensitivity"] == pytest.approx(3 / 4)
    assert m["benign_vs_malignant"]["specificity"] == pytest.approx(1 / 2)


def test_malignant_confusions_still_count_as_detected() -> None:
    # Pre-B predicted as Pro-B is a wrong subtype but a detected malignancy.
    y = np.array([2, 3, 0])
    prob = np.array([[0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.7, 0.1], [0.1, 0.7, 0.1, 0.1]])
    m = classification_metrics(y, prob, CLASSES)
    assert m["accuracy"] == 0.0
    assert m["benign_vs_malignant"]["sensitivity"] == 1.0
    assert m["benign_vs_malignant"]["specificity"] == 0.0


def test_roc_auc_hand_computed() -> None:
    m = classification_metrics(Y_TRUE, Y_PROB, NAMES)
    # class 0: pos scores .7,.3 vs neg .1,.2,.05,.4 -> (4 + 3)/8
    # class 1: pos .8,.55 vs neg .2,.6,.05,.35 -> (4 + 3)/8
    # class 2: pos .9,.25 vs neg .1,.1,.1,.25 -> (4 + 3 + 0.5 tie)/8
    assert m["roc_auc_ovr"]["Benign"] == pytest.approx(7 / 8)
    assert m["roc_auc_ovr"]["A"] == pytest.approx(7 / 8)
    assert m["roc_auc_ovr"]["B"] == pytest.approx(7.5 / 8)
    assert m["roc_auc_ovr"]["macro"] == pytest.approx((7 / 8 + 7 / 8 + 7.5 / 8) / 3)


def test_nll_hand_computed() -> None:
    m = classification_metrics(Y_TRUE, Y_PROB, NAMES)
    p_true = [0.70, 0.30, 0.80, 0.55, 0.90, 0.25]
    assert m["nll"] == pytest.approx(-sum(math.log(p) for p in p_true) / 6)


def test_ece_hand_computed() -> None:
    # 4 bins (0,.25] (.25,.5] (.5,.75] (.75,1]:
    #   (.25,.5]: conf .40 wrong          -> acc 0,   conf .40,  gap .40, weight 1/6
    #   (.5,.75]: .70 ok, .60 no, .55 ok  -> acc 2/3, conf 1.85/3, gap .05, weight 3/6
    #   (.75,1]:  .80 ok, .90 ok          -> acc 1,   conf .85,  gap .15, weight 2/6
    # ECE = (.40 + 3*.05 + 2*.15)/6 = .85/6
    assert expected_calibration_error(Y_TRUE, Y_PROB, n_bins=4) == pytest.approx(0.85 / 6)
    bins = reliability_bins(Y_TRUE, Y_PROB, n_bins=4)
    assert bins["count"] == [0, 1, 3, 2]
    assert bins["accuracy"][0] is None
    assert bins["accuracy"][2] == pytest.approx(2 / 3)
    assert bins["confidence"][2] == pytest.approx(1.85 / 3)


def test_ece_perfect_and_worst() -> None:
    y = np.array([0, 1, 2])
    assert expected_calibration_error(y, np.eye(3)) == pytest.approx(0.0)
    wrong = np.eye(3)[[1, 2, 0]]  # confident and always wrong
    assert expected_calibration_error(y, wrong) == pytest.approx(1.0)


def test_absent_classes_and_tiny_batches_do_not_crash() -> None:
    y = np.array([0, 0, 1])
    prob = np.array([[0.6, 0.2, 0.1, 0.1], [0.3, 0.5, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1]])
    m = classification_metrics(y, prob, CLASSES)
    assert m["roc_auc_ovr"]["Pre-B"] is None
    assert m["roc_auc_ovr"]["Pro-B"] is None
    assert m["roc_auc_ovr"]["Benign"] is not None
    assert m["per_class"]["Pro-B"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert len(m["confusion_matrix"]) == 4
    json.dumps(m, allow_nan=False)  # JSON-able, no NaN

    one = classification_metrics(np.array([3]), np.array([[0.1, 0.1, 0.1, 0.7]]), CLASSES)
    assert one["accuracy"] == 1.0
    assert one["roc_auc_ovr"]["macro"] is None
    assert one["benign_vs_malignant"] == {"sensitivity": 1.0, "specificity": None}
    json.dumps(one, allow_nan=False)


def test_invalid_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="class names"):
        classification_metrics(Y_TRUE, Y_PROB, CLASSES)
    with pytest.raises(ValueError, match="samples"):
        classification_metrics(Y_TRUE[:3], Y_PROB, NAMES)
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(np.array([], dtype=int), np.zeros((0, 3)), NAMES)


def test_review_tradeoff_hand_computed() -> None:
    # conf [.70 .60 .80 .55 .90 .40]; errors at conf .60 and .40
    rows = review_tradeoff(Y_TRUE, Y_PROB, [0.0, 0.5, 0.65, 1.01])
    assert [r["threshold"] for r in rows] == [0.0, 0.5, 0.65, 1.01]
    assert [r["flagged_fraction"] for r in rows] == pytest.approx([0.0, 1 / 6, 3 / 6, 1.0])
    assert [r["errors_caught_fraction"] for r in rows] == pytest.approx([0.0, 1 / 2, 1.0, 1.0])
    assert [r["n_errors_caught"] for r in rows] == [0, 1, 2, 2]
    assert rows[0]["accepted_accuracy"] == pytest.approx(4 / 6)
    assert rows[1]["accepted_accuracy"] == pytest.approx(4 / 5)
    assert rows[2]["accepted_accuracy"] == pytest.approx(1.0)
    assert rows[3]["accepted_accuracy"] is None
    assert all(r["n_errors"] == 2 for r in rows)
    json.dumps(rows, allow_nan=False)


def test_review_tradeoff_without_errors() -> None:
    rows = review_tradeoff(np.array([0, 1]), np.eye(2) * 0.8 + 0.1, [0.5, 0.95])
    assert rows[0]["errors_caught_fraction"] is None
    assert rows[1]["flagged_fraction"] == 1.0

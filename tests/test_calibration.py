"""Temperature scaling recovers a known over-confidence factor on a synthetic model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leukray.calibration import (
    TEMPERATURE_BOUNDS,
    fit_temperature,
    nll_with_temperature,
    softmax_with_temperature,
)


def _synthetic(n: int = 4000, c: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(true_logits): true_logits are perfectly calibrated by construction."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(scale=1.5, size=(n, c))
    prob = np.exp(true_logits) / np.exp(true_logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(c, p=p) for p in prob])
    return true_logits, labels


def test_recovers_overconfidence_factor() -> None:
    true_logits, labels = _synthetic()
    logits = true_logits * 3.0  # an over-confident model: T should be ~3
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll_with_temperature(logits, labels, t) < nll_with_temperature(logits, labels, 1.0)
    calibrated = softmax_with_temperature(logits, t)
    np.testing.assert_array_equal(calibrated.argmax(axis=1), logits.argmax(axis=1))
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0)


def test_underconfident_model_gets_t_below_one() -> None:
    true_logits, labels = _synthetic(seed=1)
    t = fit_temperature(true_logits * 0.5, labels)
    assert t == pytest.approx(0.5, rel=0.1)


def test_calibrated_model_keeps_t_near_one() -> None:
    true_logits, labels = _synthetic(seed=2)
    assert fit_temperature(true_logits, labels) == pytest.approx(1.0, rel=0.1)


def test_deterministic_and_accepts_torch() -> None:
    true_logits, labels = _synthetic(n=500, seed=3)
    logits = true_logits * 2.0
    t1 = fit_temperature(logits, labels)
    t2 = fit_temperature(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    assert t1 == fit_temperature(logits, labels)
    assert t2 == pytest.approx(t1, rel=1e-4)
    probs = softmax_with_temperature(torch.tensor(logits), t1)
    assert isinstance(probs, np.ndarray) and probs.shape == logits.shape


def test_no_validation_errors_gives_rule_of_succession_confidence() -> None:
    # All right, every margin 1: plain NLL would drive T to its lower bound (confidence 1.0 everywhere). The
    # rule-of-succession target 1 - 1/(N+2) = 5/6 (N = 4) is met exactly when e^(1/T) / (e^(1/T) + 2) = 5/6,
    # i.e. e^(1/T) = 10, T = 1 / ln 10.
    logits = np.eye(3)[[0, 1, 2, 0]] * 1.0
    t = fit_temperature(logits, [0, 1, 2, 0])
    assert t == pytest.approx(1 / np.log(10), rel=1e-4)
    np.testing.assert_allclose(softmax_with_temperature(logits, t).max(axis=1), 5 / 6, rtol=1e-4)
    # A large split, all right with margins of 8 to 20 logits: confidences stay below 1, so a review threshold
    # can still flag the least certain images.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    big = rng.normal(size=(300, 4))
    big[np.arange(300), labels] += rng.uniform(8, 20, 300)
    t_big = fit_temperature(big, labels)
    conf = softmax_with_temperature(big, t_big).max(axis=1)
    assert t_big > 1.0 and TEMPERATURE_BOUNDS[0] < t_big < TEMPERATURE_BOUNDS[1]
    assert conf.min() < 0.99 and conf.mean() == pytest.approx(1 - 1 / 302, abs=0.01)


def test_bounded_on_degenerate_data() -> None:
    # Always wrong: NLL keeps falling as T grows, so T must stop at the upper bound.
    t_wrong = fit_temperature(np.eye(3)[[1, 2, 0, 1]], [0, 1, 2, 0])
    assert TEMPERATURE_BOUNDS[1] * 0.99 <= t_wrong <= TEMPERATURE_BOUNDS[1]


def test_softmax_with_temperature_values() -> None:
    p = softmax_with_temperature(np.array([[2.0, 0.0]]), 2.0)
    e = np.exp(1.0)
    np.testing.assert_allclose(p, [[e / (e + 1), 1 / (e + 1)]])


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="temperature"):
        softmax_with_temperature(np.zeros((1, 2)), 0.0)
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="zero samples"):
        fit_temperature(np.zeros((0, 2)), [])


def test_adaptive_threshold_is_the_loosest_that_keeps_the_full_view_answers():
    """The cascade threshold re-scores every validation image whose one-view class differs from its eight-view
    class, with the doubt of the most confident one halved; images above it keep their one-view answer."""
    from leukray.calibration import fit_adaptive
    from leukray.inference import softmax

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    full = rng.normal(0, 1, (400, 4))
    full[np.arange(400), labels] += 6.0
    one = full + rng.normal(0, 1.5, full.shape)  # one view: noisier, some classes differ
    ad = fit_adaptive(one, full, labels, safety=2.0, min_threshold=0.0)
    conf = softmax(one, ad["temperature_one_view"]).max(1)
    differ = one.argmax(1) != full.argmax(1)
    assert differ.sum() == ad["one_view_full_disagreements"] > 0
    assert ad["threshold_exact"] == pytest.approx(conf[differ].max())
    assert ad["threshold"] == pytest.approx(1 - (1 - conf[differ].max()) / 2)
    rescored = conf < ad["threshold"]
    assert (rescored | ~differ).all() and ad["agreement_with_full"] == 1.0
    assert ad["rescored_fraction"] == pytest.approx(rescored.mean()) and 0 < rescored.mean() < 1
    assert ad["temperature_one_view"] == fit_temperature(one, labels)  # each path its own temperature
    assert ad["temperature_full"] == fit_temperature(full, labels)
    # the floor: never fewer re-scored images than those below min_threshold
    assert fit_adaptive(one, one, labels, min_threshold=0.9)["threshold"] == 0.9

"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

Fine-tuned CNNs are over-confident, and the scorer's `confidence` / `needs_review` columns are only
meaningful if probabilities are calibrated. One scalar T > 0 divides the logits: it is fitted on validation
logits by minimising NLL, never changes the argmax (so accuracy is untouched), and is stored in the model card.

The targets are not plain one-hot: each puts 1/(N+2) of its mass on the wrong classes (Laplace's rule of
succession: after N validation images, all of them right, the chance that the next one is wrong is 1/(N+2), not
0). A validation split without errors is common for a good model on a few hundred images, and plain NLL then keeps
falling as T -> 0: T ends at its lower bound, every confidence is ~1 and no review threshold flags anything (seen on
the Taleqani split: a model whose two test errors had confidence 0.52 and 0.59 at T=1 shipped them at 0.999). With
the pseudo-count the fit is finite. It weighs about one error: negligible against dozens of real errors, it leans
T towards under-confidence when the split has one or two (the safe side for a review flag).

T is optimised in log space (so it stays positive and the search is scale-symmetric) with scipy's bounded
Brent method on a closed interval. NLL is convex in 1/T, hence unimodal in log T, so a bounded scalar search
finds the global optimum; it is deterministic (no random init, no data order, float64 throughout).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

__all__ = ["FIT_DESCRIPTION", "TEMPERATURE_BOUNDS", "fit_adaptive", "fit_mode", "fit_temperature", "nll_with_temperature",
           "softmax_with_temperature"]

log = logging.getLogger(__name__)

FIT_DESCRIPTION = "cross-entropy against rule-of-succession targets (leukray.calibration)"
"""How `fit_temperature` fits T, as model cards record it."""

TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)
"""Sane range for T: outside it the validation set is degenerate (e.g. all correct, or labels unrelated)."""


def _as_logits(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Logits as a float64 (N, C) numpy array, whatever device or dtype the model produced them on."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("logits contain NaN or inf")
    return arr


def _as_labels(labels: np.ndarray | torch.Tensor | list[int], n: int, n_classes: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels).astype(np.int64).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{n} logit rows but {arr.shape[0]} labels")
    if n and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(f"labels must be in [0, {n_classes - 1}], got range [{arr.min()}, {arr.max()}]")
    return arr


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    logp = log_softmax(logits / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), labels].mean())


def _succession_targets(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, C) targets: 1 - 1/(N+2) on the label, 1/(N+2) spread evenly over the other classes."""
    n = len(labels)
    eps = 1.0 / (n + 2)
    targets = np.full((n, n_classes), eps / max(n_classes - 1, 1))
    targets[np.arange(n), labels] = 1.0 - eps if n_classes > 1 else 1.0
    return targets


def _cross_entropy(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    return float(-(targets * log_softmax(logits / temperature, axis=1)).sum(axis=1).mean())


def nll_with_temperature(
    logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | list[int], temperature: float = 1.0
) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / T): the objective T is fitted on."""
    z = _as_logits(logits)
    y = _as_labels(labels, z.shape[0], z.shape[1])
    if z.shape[0] == 0:
        raise ValueError("no samples")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _nll(z, y, float(temperature))


def fit_temperature(
    logits: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | list[int],
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """Fit T minimising the validation cross-entropy of softmax(logits / T) against rule-of-succession targets
    (module docstring); returns T within `bounds`.

    logits: (N, C) raw model outputs on the validation split (not probabilities); labels: (N,) int.
    Use validation, not training, logits: training logits are over-fitted and would give T ≈ 1.
    """
    z = _as_logits(logits)
    y = _as_labels(labels, z.shape[0], z.shape[1])
    if z.shape[0] == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    targets = _succession_targets(y, z.shape[1])
    result = minimize_scalar(
        lambda log_t: _cross_entropy(z, targets, math.exp(log_t)),
        bounds=(math.log(lo), math.log(hi)),
        method="bounded",
        options={"xatol": 1e-6, "maxiter": 500},
    )
    temperature = float(math.exp(result.x))
    # Never return a T that is worse than no scaling (possible only if the search failed to converge).
    if _cross_entropy(z, targets, temperature) > _cross_entropy(z, targets, 1.0) and lo <= 1.0 <= hi:
        log.warning("temperature search did not improve on T=1 (%s); keeping T=1", result.message)
        return 1.0
    if math.isclose(temperature, lo, rel_tol=1e-3) or math.isclose(temperature, hi, rel_tol=1e-3):
        log.warning("fitted temperature %.4g is at the bound %s; the validation logits look degenerate (labels "
                    "unrelated to the logits, or logits all equal)", temperature, bounds)
    return temperature


def softmax_with_temperature(logits: np.ndarray | torch.Tensor, temperature: float) -> np.ndarray:
    """Calibrated probabilities softmax(logits / T) as a float64 (N, C) array (rows sum to 1)."""
    from .inference import softmax as calibrated

    return calibrated(_as_logits(logits), float(temperature))


ADAPTIVE_SAFETY = 2.0
"""The cascade threshold halves the doubt (1 - confidence) of the most confident validation image whose one-view
class differs from its full-view class."""
ADAPTIVE_MIN_THRESHOLD = 0.9
"""…and never re-scores fewer images than those below this one-view confidence."""


def fit_adaptive(one_view_logits: np.ndarray, full_logits: np.ndarray, labels: np.ndarray,
                 safety: float = ADAPTIVE_SAFETY, min_threshold: float = ADAPTIVE_MIN_THRESHOLD) -> dict:
    """The `adaptive` test-time mode on validation logits: a temperature per path (one view, all views) and the
    cascade threshold — the loosest one-view confidence below which images must be re-scored for the adaptive
    predictions to equal the full-view predictions on these images, widened by `safety` (doubt / safety) and
    floored at `min_threshold`. Returns the card's `adaptive` block (without `full`)."""
    from .inference import softmax

    one, full = _as_logits(one_view_logits), _as_logits(full_logits)
    y = _as_labels(labels, one.shape[0], one.shape[1])
    t_one, t_full = fit_temperature(one, y), fit_temperature(full, y)
    conf = softmax(one, t_one).max(axis=1)
    differ = one.argmax(1) != full.argmax(1)
    exact = float(conf[differ].max()) if differ.any() else 0.0
    threshold = max(1.0 - (1.0 - exact) / safety, min_threshold)
    rescored = conf < threshold
    mixed = np.where(rescored, full.argmax(1), one.argmax(1))
    return {"threshold": threshold, "threshold_exact": exact, "safety": safety, "min_threshold": min_threshold,
            "temperature_one_view": t_one, "temperature_full": t_full, "n": int(len(y)),
            "one_view_full_disagreements": int(differ.sum()), "rescored_fraction": float(rescored.mean()) if len(y) else 0.0,
            "agreement_with_full": float((mixed == full.argmax(1)).mean()) if len(y) else 1.0}


def fit_mode(model, images: np.ndarray, labels: np.ndarray, mode: str, num_classes: int):
    """Run `model` (a `leukray.inference` backend) over validation images in test-time `mode` and fit its
    temperature(s): returns the rows' `Outputs` as scoring will compute them (adaptive: the one-view or the
    full-view outputs per row, each with its path's temperature) and the card fields (`temperature`, and for
    adaptive the `adaptive` block: both temperatures, the cascade threshold, the re-scored fraction)."""
    from .inference import Outputs
    from .tta import ADAPTIVE, ADAPTIVE_FULL, view_ids

    k, n = num_classes, len(images)
    ids = view_ids(mode)
    if mode != ADAPTIVE:
        out = np.asarray(model.mean_views(images, ids), np.float32)
        temperature = fit_temperature(out[:, :k], labels)
        return Outputs(out, np.full(n, len(ids), np.int64), np.full(n, temperature)), {"temperature": temperature}
    one = np.asarray(model.mean_views(images, [0]), np.float64)
    full = (one + np.asarray(model.mean_views(images, ids[1:]), np.float64) * (len(ids) - 1)) / len(ids)
    ad = fit_adaptive(one[:, :k], full[:, :k], labels)
    from .inference import softmax

    unsure = softmax(one[:, :k], ad["temperature_one_view"]).max(axis=1) < ad["threshold"]
    out = Outputs(np.where(unsure[:, None], full, one).astype(np.float32), np.where(unsure, len(ids), 1),
                  np.where(unsure, ad["temperature_full"], ad["temperature_one_view"]))
    return out, {"temperature": ad["temperature_full"], "adaptive": {"full": ADAPTIVE_FULL, **ad}}

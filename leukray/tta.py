"""Test-time augmentation: a package's logits are the mean of its logits over flipped/rotated views of each image.

Why: a cell in a smear has no up and no handedness, and every recipe trains on random flips and rotations, so
what the network says about one orientation of an image is one noisy sample of what it says about the cell.
Averaging the 8 dihedral views (4 rotations × mirror) removes that noise; the views are exact pixel
permutations (no resampling). On the Taleqani validation rows it lowered the calibrated NLL of every seed of the
default recipe and removed its validation errors; it is no free lunch for every network (the study's recipe
gained an error: README "Results"). The cost is one forward pass per view.

Modes: `none` (1 view), `flips4` (identity, horizontal, vertical, both = 180° rotation), `dihedral8` (those and
the four transposed views: ±90° rotations and the two diagonal mirrors). A package records the mode its
temperature was fitted with (card `tta`; packages from before test-time augmentation: `none`); evaluate, scoring
and calibrate use it unless told otherwise (`package`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

TTA_VIEWS = {"none": 1, "flips4": 4, "dihedral8": 8}
TTA_CHOICES = ("package", *TTA_VIEWS)


def check_tta(mode: str) -> str:
    if mode not in TTA_VIEWS:
        raise ValueError(f"tta={mode!r} is not a test-time augmentation mode; allowed: {', '.join(TTA_VIEWS)}")
    return mode


def package_tta(card: dict[str, Any]) -> str:
    """The mode a package's temperature was fitted with."""
    return check_tta(card.get("tta") or "none")


def resolve_tta(requested: str, card: dict[str, Any]) -> str:
    """`package` → the card's mode; anything else must be a mode."""
    if requested == "package":
        return package_tta(card)
    if requested not in TTA_VIEWS:
        raise ValueError(f"tta={requested!r}; allowed: {', '.join(TTA_CHOICES)}")
    return requested


def views(images_nhwc: np.ndarray, mode: str) -> Iterator[np.ndarray]:
    """The views of a (N, H, W, C) batch, identity first (square images for the transposed ones)."""
    n = TTA_VIEWS[check_tta(mode)]
    x = images_nhwc
    if n > 4 and x.shape[1] != x.shape[2]:
        raise ValueError(f"tta={mode} needs square images, got {x.shape[1]}x{x.shape[2]}")
    flips = (x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1])
    yield from flips[:n]
    if n > 4:
        t = x.transpose(0, 2, 1, 3)
        yield from (t, t[:, :, ::-1], t[:, ::-1], t[:, ::-1, ::-1])


def torch_views(x_nchw: Any, mode: str) -> Iterator[Any]:
    """`views` for a torch NCHW batch already on its device (the GPU scorer uploads each batch once), same order."""
    n = TTA_VIEWS[check_tta(mode)]
    flips = (x_nchw, x_nchw.flip(-1), x_nchw.flip(-2), x_nchw.flip((-2, -1)))
    yield from flips[:n]
    if n > 4:
        t = x_nchw.transpose(-1, -2)
        yield from (t, t.flip(-1), t.flip(-2), t.flip((-2, -1)))


def tta_logits(predict: Callable[[np.ndarray], np.ndarray], images_nhwc: np.ndarray, mode: str) -> np.ndarray:
    """Mean outputs over the views; `predict` maps a uint8 NHWC batch to (N, K) float logits, or to logits and
    features side by side (`leukray.ood.split_outputs`): both are averaged."""
    if TTA_VIEWS[check_tta(mode)] == 1:
        return predict(images_nhwc)
    total = None
    for v in views(images_nhwc, mode):
        out = np.asarray(predict(np.ascontiguousarray(v)), dtype=np.float64)
        total = out if total is None else total + out
    return (total / TTA_VIEWS[mode]).astype(np.float32)


def with_tta(predict: Callable[[np.ndarray], np.ndarray], mode: str) -> Callable[[np.ndarray], np.ndarray]:
    check_tta(mode)
    if mode == "none":
        return predict
    return lambda images: tta_logits(predict, images, mode)

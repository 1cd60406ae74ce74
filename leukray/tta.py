"""Test-time augmentation: a package's logits are the mean of its logits over flipped/rotated views of each image.

Why: a cell in a smear has no up and no handedness, and every recipe trains on random flips and rotations, so
what the network says about one orientation of an image is one noisy sample of what it says about the cell.
Averaging the 8 dihedral views (4 rotations × mirror) removes that noise; the views are exact pixel
permutations (no resampling). On the Taleqani validation rows it lowered the calibrated NLL of every seed of the
default recipe and removed its validation errors; it is no free lunch for every network (the study's recipe
gained an error: docs/results.md). The cost is one forward pass per view.

Modes: `none` (1 view), `flips4` (identity, horizontal, vertical, both = 180° rotation), `dihedral8` (those and
the four transposed views: ±90° rotations and the two diagonal mirrors), and `adaptive`: every image is scored
in the identity view; only images whose calibrated one-view confidence is below the package's cascade threshold
are scored in the seven other dihedral views and averaged (`leukray.calibration.fit_adaptive`; the views can
only change the answer near a decision boundary, so they are spent where the model hesitates). A package
records the mode its temperature was fitted with (card `tta`; packages from before test-time augmentation:
`none`); evaluate, scoring and calibrate use it unless told otherwise (`package`).

This module defines the views; `leukray.inference` runs them.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

TTA_VIEWS = {"none": 1, "flips4": 4, "dihedral8": 8}
"""Fixed modes and their number of views."""
ADAPTIVE, ADAPTIVE_FULL = "adaptive", "dihedral8"
"""The cascade mode, and the fixed mode its uncertain images are scored in."""
TTA_MODES = (*TTA_VIEWS, ADAPTIVE)
TTA_CHOICES = ("package", *TTA_MODES)


def check_tta(mode: str) -> str:
    if mode not in TTA_MODES:
        raise ValueError(f"tta={mode!r} is not a test-time augmentation mode; allowed: {', '.join(TTA_MODES)}")
    return mode


def package_tta(card: dict[str, Any]) -> str:
    """The mode a package's temperature was fitted with."""
    return check_tta(card.get("tta") or "none")


def resolve_tta(requested: str, card: dict[str, Any]) -> str:
    """`package` → the card's mode; anything else must be a mode."""
    if requested == "package":
        return package_tta(card)
    if requested not in TTA_MODES:
        raise ValueError(f"tta={requested!r}; allowed: {', '.join(TTA_CHOICES)}")
    return requested


def view_ids(mode: str) -> list[int]:
    """The views a fixed mode averages (indices for `view`); adaptive: those of its full mode."""
    mode = ADAPTIVE_FULL if check_tta(mode) == ADAPTIVE else mode
    return list(range(TTA_VIEWS[mode]))


def view(images_nhwc: np.ndarray, i: int) -> np.ndarray:
    """View i (0..7) of a (N, H, W, C) batch: 0 identity, 1 horizontal mirror, 2 vertical mirror, 3 half turn,
    4-7 the same of the transposed batch (square images only)."""
    x = images_nhwc
    if i >= 4:
        if x.shape[1] != x.shape[2]:
            raise ValueError(f"the transposed views need square images, got {x.shape[1]}x{x.shape[2]}")
        x = x.transpose(0, 2, 1, 3)
    return (x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1])[i % 4]


def torch_view(x_nchw: Any, i: int) -> Any:
    """`view` for a torch NCHW batch already on its device (the GPU scorer uploads each batch once)."""
    x = x_nchw.transpose(-1, -2) if i >= 4 else x_nchw
    return (x, x.flip(-1), x.flip(-2), x.flip((-2, -1)))[i % 4]


def views(images_nhwc: np.ndarray, mode: str) -> Iterator[np.ndarray]:
    """The views of a (N, H, W, C) batch in a fixed mode, identity first."""
    if mode not in TTA_VIEWS:
        raise ValueError(f"tta={mode!r} has no fixed views; allowed: {', '.join(TTA_VIEWS)}")
    if TTA_VIEWS[mode] > 4 and images_nhwc.shape[1] != images_nhwc.shape[2]:
        raise ValueError(f"tta={mode} needs square images, got {images_nhwc.shape[1]}x{images_nhwc.shape[2]}")
    return (view(images_nhwc, i) for i in view_ids(mode))


def torch_views(x_nchw: Any, mode: str) -> Iterator[Any]:
    """`views` for a torch NCHW batch, same order."""
    if mode not in TTA_VIEWS:
        raise ValueError(f"tta={mode!r} has no fixed views; allowed: {', '.join(TTA_VIEWS)}")
    return (torch_view(x_nchw, i) for i in view_ids(mode))

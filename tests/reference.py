"""Independent reference computations for the tests: the package's PyTorch model on decoded images, with the
package's test-time augmentation written with torch's own rotations (not leukray.tta's numpy views), and the
adaptive cascade written from the card's fields (not leukray.inference's Predictor)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from leukray.colour import signature, structure

FIXED_VIEWS = {"none": 1, "flips4": 4, "dihedral8": 8}


def package_logits(pkg, images_nhwc: np.ndarray, tta: str | None = None) -> np.ndarray:
    """float64 logits of `pkg.model`, averaged over the views of a fixed `tta` (default: the package's card `tta`)."""
    return package_outputs(pkg, images_nhwc, tta)[:, :len(pkg.card.get("classes") or "0123")]


def package_outputs(pkg, images_nhwc: np.ndarray, tta: str | None = None) -> np.ndarray:
    """float64 (N, K + 1280 + 8): logits, pooled features (global average pool of the backbone's last block, taken
    here from the modules, not from LeukNet.forward_with_features), the colour signature and structure of the input, averaged
    over the views of a fixed `tta` (none | flips4 | dihedral8; default: the card's)."""
    tta = tta or pkg.card.get("tta") or "none"
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).float()
    if tta == "none":
        views = [x]
    elif tta == "flips4":
        views = [x, x.flip(3), x.flip(2), torch.rot90(x, 2, (2, 3))]
    elif tta == "dihedral8":
        views = [torch.rot90(m, k, (2, 3)) for m in (x, x.flip(3)) for k in range(4)]
    else:
        raise ValueError(f"{tta!r} is not a fixed mode: use package_predictions for adaptive")
    model = pkg.model.eval()

    def both(v: torch.Tensor) -> torch.Tensor:
        feats = model.features(model.preprocess(v)).mean(dim=(2, 3))
        return torch.cat([model.head(feats), feats, signature(v), structure(v)], 1).double()

    with torch.inference_mode():
        return torch.stack([both(v) for v in views]).mean(0).numpy()


def calibrated(logits: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """float64 softmax(logits / T) with torch's softmax; T a scalar or one per row."""
    t = torch.as_tensor(np.broadcast_to(np.asarray(temperature, np.float64), (len(logits),)).copy())
    return torch.softmax(torch.from_numpy(np.asarray(logits, np.float64)) / t[:, None], 1).numpy()


@dataclass
class Predictions:
    """What a package's rows hold for N images, computed independently."""
    outputs: np.ndarray
    """(N, K + 1280 + 8) float64: the outputs averaged over the views the row took."""
    views: np.ndarray
    """(N,) int: views the row took."""
    temperature: np.ndarray
    """(N,) float: the temperature of the row's path."""
    probs: np.ndarray
    """(N, K) calibrated probabilities."""

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(1)


def package_predictions(pkg, images_nhwc: np.ndarray, tta: str | None = None) -> Predictions:
    """The package's rows under `tta` (default or `package`: the card's `tta`), from the card's fields alone.

    Fixed modes: every row in the mode's views, with the card's `temperature` — except that a card with an
    `adaptive` block carries the one-view path's temperature (`temperature_one_view`, used for `none`) and the full
    path's (`temperature_full`, used for its `full` mode, dihedral8). `adaptive`: every image in the identity view;
    an image whose one-view confidence, softmax(logits / temperature_one_view), is below `threshold` is scored in
    the full mode's views instead, with `temperature_full`."""
    card = pkg.card
    k = len(card.get("classes") or "0123")
    mode = (card.get("tta") or "none") if tta in (None, "package") else tta
    ad = card.get("adaptive")
    if mode != "adaptive":
        t = float(card.get("temperature") or 1.0)
        if ad and mode == "none":
            t = float(ad["temperature_one_view"])
        elif ad and mode == ad.get("full", "dihedral8"):
            t = float(ad["temperature_full"])
        out = package_outputs(pkg, images_nhwc, mode)
        n = len(out)
        temps = np.full(n, t)
        return Predictions(out, np.full(n, FIXED_VIEWS[mode]), temps, calibrated(out[:, :k], temps))
    if not ad:
        raise ValueError(f"tta=adaptive on a card without an 'adaptive' block (tta {card.get('tta')!r})")
    full = ad.get("full", "dihedral8")
    one = package_outputs(pkg, images_nhwc, "none")
    unsure = calibrated(one[:, :k], float(ad["temperature_one_view"])).max(1) < float(ad["threshold"])
    out = one.copy()
    if unsure.any():
        out[unsure] = package_outputs(pkg, images_nhwc[unsure], full)
    views = np.where(unsure, FIXED_VIEWS[full], 1)
    temps = np.where(unsure, float(ad["temperature_full"]), float(ad["temperature_one_view"]))
    return Predictions(out, views, temps, calibrated(out[:, :k], temps))

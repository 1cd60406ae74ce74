"""Independent reference computations for the tests: the package's PyTorch model on decoded images, with the
package's test-time augmentation written with torch's own rotations (not leukray.tta's numpy views)."""

from __future__ import annotations

import numpy as np
import torch

from leukray.colour import signature


def package_logits(pkg, images_nhwc: np.ndarray, tta: str | None = None) -> np.ndarray:
    """float64 logits of `pkg.model`, averaged over the views of `tta` (default: the package's card `tta`)."""
    return package_outputs(pkg, images_nhwc, tta)[:, :len(pkg.card.get("classes") or "0123")]


def package_outputs(pkg, images_nhwc: np.ndarray, tta: str | None = None) -> np.ndarray:
    """float64 (N, K + 1280 + 7): logits, pooled features (global average pool of the backbone's last block, taken
    here from the modules, not from LeukNet.forward_with_features) and the colour signature of the input, averaged
    over the views of `tta`."""
    tta = tta or pkg.card.get("tta") or "none"
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).float()
    if tta == "none":
        views = [x]
    elif tta == "flips4":
        views = [x, x.flip(3), x.flip(2), torch.rot90(x, 2, (2, 3))]
    elif tta == "dihedral8":
        views = [torch.rot90(m, k, (2, 3)) for m in (x, x.flip(3)) for k in range(4)]
    else:
        raise ValueError(tta)
    model = pkg.model.eval()

    def both(v: torch.Tensor) -> torch.Tensor:
        feats = model.features(model.preprocess(v)).mean(dim=(2, 3))
        return torch.cat([model.head(feats), feats, signature(v)], 1).double()

    with torch.inference_mode():
        return torch.stack([both(v) for v in views]).mean(0).numpy()

"""Independent reference computations for the tests: the package's PyTorch model on decoded images, with the
package's test-time augmentation written with torch's own rotations (not leukray.tta's numpy views)."""

from __future__ import annotations

import numpy as np
import torch


def package_logits(pkg, images_nhwc: np.ndarray, tta: str | None = None) -> np.ndarray:
    """float64 logits of `pkg.model`, averaged over the views of `tta` (default: the package's card `tta`)."""
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
    with torch.inference_mode():
        return torch.stack([model(v).double() for v in views]).mean(0).numpy()

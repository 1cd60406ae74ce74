"""How another lab's camera, lamp and stain change an image: the colour model behind augmentation and the suite.

A smear image is stained cells under a lamp, recorded by a camera. Between labs three things differ:
- **the camera's colour response**: white balance and colour temperature are per-channel gains, applied by the
  camera in linear light, before its tone curve; a tinted lamp or filter is a gain too (a colour cast);
- **exposure**: one gain on all channels in linear light; highlights clip at the sensor's white, so an over-exposed
  image cannot be un-scaled (the smear background already sits at 255 in most images);
- **the stain batch**: more or less dye, and a different balance of the two dyes. Stain absorbs light, so it is
  additive in optical density (OD = -ln(I/I₀), Beer–Lambert); colour deconvolution (Ruifrok & Johnston, Anal Quant
  Cytol Histol 2001) splits OD into per-dye concentrations, which are scaled and recombined.

Linear light is approximated by the power law x^2.2 (sRGB's curve without its short linear toe). Everything is
torch on float NCHW in [0, 1], batched, on whatever device the batch lives on: `leukray.augment` draws factors
per image at training time, `leukray.perturb` applies fixed ones at evaluation time.
"""

from __future__ import annotations

import torch

GAMMA = 2.2
"""Display value = linear ** (1 / GAMMA)."""

RGB_FROM_STAIN = torch.tensor([[0.65, 0.70, 0.29],   # haematoxylin-like (azure / methylene blue: nuclei, purple-blue)
                               [0.07, 0.99, 0.11],   # eosin (cytoplasm, red cells: pink)
                               [0.27, 0.57, 0.78]],  # residual
                              dtype=torch.float64)
"""Ruifrok & Johnston's OD vectors per dye (rows), the same constants as scikit-image's `rgb_from_hed`.
Romanowsky stains (Wright, Giemsa, May–Grünwald) are also a basic blue dye plus eosin, so the first two rows
describe them well enough to vary the amount and balance of dye."""
STAIN_FROM_RGB = torch.linalg.inv(RGB_FROM_STAIN)
_MIN_INTENSITY = 0.25 / 255.0
"""OD is capped at -ln(0.25/255): finite for black pixels, which still round back to 0."""


def _factor(values: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """One factor for the batch or one per image → (N, 1, 1, 1)."""
    v = torch.as_tensor(values, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    return v.expand(x.shape[0], 1, 1, 1)


def camera_gains(x: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """Per-channel gains (N, 3) in linear light, clipped at the sensor's white: white balance, colour temperature,
    a tinted lamp (a colour cast), and exposure (the same gain on all three channels)."""
    g = torch.as_tensor(gains, dtype=x.dtype, device=x.device).reshape(-1, 3, 1, 1)
    return ((x.clamp(0, 1) ** GAMMA) * g).clamp(0, 1) ** (1.0 / GAMMA)


def exposure(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Exposure ×factor in linear light (one gain per image, or one for the batch); highlights clip."""
    return ((x.clamp(0, 1) ** GAMMA) * _factor(factor, x)).clamp(0, 1) ** (1.0 / GAMMA)


def stain_concentration(x: torch.Tensor, blue: torch.Tensor | float, eosin: torch.Tensor | float) -> torch.Tensor:
    """Scale the concentration of the basic (blue) dye and of eosin by per-image factors: a stronger or weaker stain
    batch (both up or down) or a different balance between the two dyes. The unstained background stays as it is."""
    od = -torch.log(x.clamp(_MIN_INTENSITY, 1))
    conc = torch.einsum("nchw,cd->ndhw", od, STAIN_FROM_RGB.to(x))
    scale = torch.cat([_factor(blue, x), _factor(eosin, x), torch.ones_like(_factor(1.0, x))], 1)
    od = torch.einsum("ndhw,dc->nchw", conc * scale, RGB_FROM_STAIN.to(x))
    return torch.exp(-od).clamp(0, 1)

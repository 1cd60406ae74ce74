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

import functools

import numpy as np
import torch

from .ood import SIGNATURE_DIM, STATS_DIM  # noqa: F401  (the lengths of `signature` and `image_stats`)

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


def scale_light(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Multiply the light reaching the sensor by `gain` (broadcast against NCHW: per image, channel or pixel), in
    linear light, clipped at the sensor's white: what every camera, lamp and illumination change here is."""
    return ((x.clamp(0, 1) ** GAMMA) * gain).clamp(0, 1) ** (1.0 / GAMMA)


def camera_gains(x: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """Per-channel gains (N, 3) in linear light, clipped at the sensor's white: white balance, colour temperature,
    a tinted lamp (a colour cast), and exposure (the same gain on all three channels)."""
    return scale_light(x, torch.as_tensor(gains, dtype=x.dtype, device=x.device).reshape(-1, 3, 1, 1))


def exposure(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Exposure ×factor in linear light (one gain per image, or one for the batch); highlights clip."""
    return scale_light(x, _factor(factor, x))


def stain_concentration(x: torch.Tensor, blue: torch.Tensor | float, eosin: torch.Tensor | float) -> torch.Tensor:
    """Scale the concentration of the basic (blue) dye and of eosin by per-image factors: a stronger or weaker stain
    batch (both up or down) or a different balance between the two dyes. The unstained background stays as it is."""
    od = -torch.log(x.clamp(_MIN_INTENSITY, 1))
    conc = torch.einsum("nchw,cd->ndhw", od, STAIN_FROM_RGB.to(x))
    scale = torch.cat([_factor(blue, x), _factor(eosin, x), torch.ones_like(_factor(1.0, x))], 1)
    od = torch.einsum("ndhw,dc->nchw", conc * scale, RGB_FROM_STAIN.to(x))
    return torch.exp(-od).clamp(0, 1)


_STAINED_OD = 0.3
"""Pixels whose summed OD is below this are background (unstained)."""
DARK_FRACTION = 0.05
"""The darkest fraction of pixels (by summed OD): the nuclei, the most strongly stained part of the field."""


def optical_density(x: torch.Tensor, white_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """float [0, 255] NCHW → per-channel optical density (N, C, H, W), each channel scaled so its brightest
    `white_fraction` (the background) is white, and that background level (N, C, 1, 1): what `signature` and
    `structure` both read."""
    x = x.float()
    n, c, h, w = x.shape
    k = max(1, int(h * w * white_fraction))
    level = torch.topk(x.reshape(n, c, h * w), k, dim=2).values.mean(2).reshape(n, c, 1, 1)
    return -torch.log((x / level.clamp_min(1.0)).clamp(1.0 / 255.0, 1.0)), level


def signature(x: torch.Tensor, white_fraction: float = 0.1) -> torch.Tensor:
    """What colour the stain is, independent of how much of it there is and of the camera's white balance:
    float [0, 255] NCHW → (N, SIGNATURE_DIM). Each channel is scaled so its brightest `white_fraction` (the
    background) is white, converted to optical density; then the unit OD direction of all stained pixels, that of
    the darkest 5 % (the nuclei), and how far from grey the latter are (0 = grey). Exposure, dye amount and channel
    gains move it little; swapped or inverted channels, a grey image or another dye's hue move it far. Part of the
    exported graph, so every backend computes it (`leukray.ood`'s colour check reads it)."""
    return _signature(optical_density(x, white_fraction)[0])


def _signature(od: torch.Tensor) -> torch.Tensor:
    n, c, h, w = od.shape
    od = od.reshape(n, c, h * w)
    total = od.sum(1)
    stained = total * (total > _STAINED_OD).float()
    mean = (od * stained[:, None]).sum(2) / stained.sum(1, keepdim=True).clamp_min(1e-6)
    cut = torch.topk(total, max(1, int(h * w * DARK_FRACTION)), dim=1).values[:, -1:]
    dark_mask = (total >= cut).float()
    count = dark_mask.sum(1, keepdim=True).clamp_min(1.0)
    dark = (od * dark_mask[:, None]).sum(2) / count
    chroma = (od - od.mean(1, keepdim=True)).norm(dim=1) / od.norm(dim=1).clamp_min(1e-6)
    chroma = (chroma * dark_mask).sum(1, keepdim=True) / count

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)

    return torch.cat([unit(mean), unit(dark), chroma], 1)


_STRUCTURE_GRID = 56
"""`structure` looks at the field on a grid of about this many cells a side (4 × 4 pixels at 224): cells and
nuclei are blobs of several grid cells, a sensor's pixel noise averages out."""
_STRUCTURE_TOP = 0.02
"""`structure` reads the strongest this fraction of the band-pass response: a few cells are enough."""
_LIT_LEVEL = 80.0
"""The background level (0–255, mean over channels) below which a field counts as unlit and `structure` is scaled
by (level / _LIT_LEVEL)²: Taleqani smears sit at 247–255, about 200 at exposure ×0.6 (linear light) and 150 at
display brightness ×0.6; a dark frame (lamp off, shutter closed) at 10–60, where the white-patch scaling
amplifies the sensor's noise into what would read as stained structure."""


def _gaussian_blur(m: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of an (N, 1, H, W) map, edges replicated."""
    r = int(3 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=m.dtype, device=m.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    m = torch.nn.functional.conv2d(torch.nn.functional.pad(m, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(torch.nn.functional.pad(m, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def structure(x: torch.Tensor, white_fraction: float = 0.1) -> torch.Tensor:
    """How much stained structure the field holds: float [0, 255] NCHW → (N, 1). The optical density (each channel
    scaled so its brightest `white_fraction` is white, summed over channels) on a ~56-cell grid, less its quadratic
    trend (a lamp's vignetting), band-passed at the size of nuclei and cells (difference of Gaussians, σ 1 and 4
    grid cells: what is left of uneven light and a sensor's noise fall outside the band), then the mean of its
    strongest 2 % less its median, scaled down for an unlit field (background under `_LIT_LEVEL`). A smear's nuclei
    give 0.25 or more, about 0.1 under the palest camera, lamp and stain a lab gives; an empty, blank or dark field
    near 0. Part of the exported graph (`leukray.ood`'s structure check)."""
    return _structure(*optical_density(x, white_fraction))


@functools.lru_cache(maxsize=8)
def _quadratic_fit(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares fit of a quadratic surface on an h × w grid as two factors, basis (h·w, 6) and its
    pseudo-inverse (6, h·w): the trend of a map m is basis @ (pinv @ m). Built in numpy from the grid's size, so the
    exported graph holds them as constants (two small matmuls, no h·w × h·w projection)."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    basis = np.stack([xx ** a * yy ** b for a in range(3) for b in range(3 - a)], -1).reshape(h * w, 6)
    return basis.astype(np.float32), np.linalg.pinv(basis).astype(np.float32)


def _detrend(m: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) map less its least-squares quadratic surface: a lamp's vignetting or uneven light is smooth, and
    left in, its slope at the field's edge (where the blur pads by repetition) reads as structure. Cells and
    nuclei, a few grid cells across, are not quadratic and stay."""
    n, _, h, w = m.shape
    basis, pinv = (torch.from_numpy(a).to(m) for a in _quadratic_fit(h, w))
    flat = m.reshape(n, h * w)
    return (flat - (flat @ pinv.T) @ basis.T).reshape(n, 1, h, w)


def _structure(od: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    n, _, h, w = od.shape
    cell = max(1, min(h, w) // _STRUCTURE_GRID)
    od = _detrend(torch.nn.functional.avg_pool2d(od.sum(1, keepdim=True), cell))
    band = (_gaussian_blur(od, 1.0) - _gaussian_blur(od, 4.0)).reshape(n, -1)
    top = torch.topk(band, max(1, int(band.shape[1] * _STRUCTURE_TOP)), dim=1).values.mean(1)
    median = torch.topk(band, band.shape[1] // 2 + 1, dim=1).values[:, -1]  # topk: exports to every backend
    lit = (level.mean((1, 2, 3)) / _LIT_LEVEL).clamp(max=1.0) ** 2  # amplified noise grows as 1 / level
    return ((top - median) * lit)[:, None]


def image_stats(x: torch.Tensor) -> torch.Tensor:
    """The guard's image-level inputs, float [0, 255] NCHW → (N, STATS_DIM): `signature` then `structure`, from one
    optical-density map."""
    od, level = optical_density(x)
    return torch.cat([_signature(od), _structure(od, level)], 1)


def other_lab(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """float NCHW [0, 255] → the same images as another lab's camera and stain batch would record them
    (`leukray.augment.colour_response`: gains, exposure, dye amounts; drawn from `g`), rounded to whole levels."""
    from .augment import colour_response

    return colour_response(x, g).round().clamp(0, 255)


def other_labs(images_nhwc, g: torch.Generator, batch_size: int = 64):
    """uint8 NHWC images → one copy of each under `other_lab`, uint8 NHWC."""
    import numpy as np

    out = np.empty_like(images_nhwc)
    for i in range(0, len(images_nhwc), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc[i:i + batch_size])).permute(0, 3, 1, 2).float()
        out[i:i + batch_size] = other_lab(x, g).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def signature_envelope(images_nhwc, seed: int, copies: int = 3, batch_size: int = 64):
    """uint8 NHWC images → the `image_stats` of the images as they are and of `copies` copies of each under another
    lab's camera and stain batch (`other_lab`; seeded): the colours the colour check must accept and the structure
    the structure check must accept (numpy float32, ((1 + copies) N, STATS_DIM))."""
    import numpy as np

    g = torch.Generator().manual_seed(int(seed))
    parts = []
    for copy in range(copies + 1):
        for i in range(0, len(images_nhwc), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images_nhwc[i:i + batch_size])).permute(0, 3, 1, 2).float()
            parts.append(image_stats(other_lab(x, g) if copy else x).numpy())
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, STATS_DIM), np.float32)

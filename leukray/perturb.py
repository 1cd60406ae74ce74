"""Robustness perturbations for the evaluation suite: stain, focus, sensor and compression shifts.

Smear images vary between labs by staining (hue, saturation; the amount and balance of dye), the camera's colour
response (white balance, colour temperature, a tinted lamp) and tone curve (gamma), exposure, illumination
(brightness, contrast, light falling off toward the corners), focus (blur), motion, sharpening, colour planes out of
register, sensor noise (read noise; shot noise of a dim lamp) and defective pixels, dust or debris on the field, the
camera software's automatic levels, JPEG and WebP compression, acquisition resolution (scale; pixelation) and
magnification (objective and camera: the same cell covers more or fewer pixels); `other_lab` shifts lamp, exposure
and stain together, as another lab differs in all of them at once. The camera and stain families follow the colour
model of `leukray.colour` (gains in linear light with clipping; dye concentrations in optical density). The evaluator
re-scores the test split under each perturbation at graded severities to show how accuracy degrades.

Layout contract: a batch is a numpy uint8 RGB array, NHWC, exactly what `leukray.images.decode_image`
returns when stacked (a single HWC image is accepted too). The result has the same dtype and shape, so it
goes through `leukray.images.to_chw` and into the model like any decoded batch.

Determinism: every perturbation is a pure function of (batch, name, severity, seed). Only `noise`, `shot_noise`,
`impulse_noise` and `dust` are random; they draw from a numpy Generator (`dust`: a torch Generator) seeded with
`seed`, never from a global RNG (torchvision's `gaussian_noise` uses the global torch RNG, which cannot be seeded per
call without side effects on other code). Noise for an image depends on its position in the batch, so evaluate with a
fixed batching to reproduce numbers exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from . import colour
from .augment import auto_levels, dust_light, jpeg_round_trip, motion_streak, pixelate, shift_plane, webp_round_trip

__all__ = ["IDENTITY", "PERTURBATIONS", "apply_perturbation", "iter_perturbations"]

PERTURBATIONS: dict[str, tuple[float, ...]] = {
    # hue shift as a fraction of the hue circle, in [-0.5, 0.5] (stain colour drift)
    "hue": (-0.1, -0.05, -0.02, 0.02, 0.05, 0.1),
    # multiplicative factors; 1 = unchanged
    "saturation": (0.5, 0.75, 1.25, 1.5),
    "brightness": (0.6, 0.8, 1.2, 1.4),
    "contrast": (0.6, 0.8, 1.2, 1.4),
    # Gaussian blur sigma in pixels (defocus)
    "blur": (0.5, 1.0, 2.0, 3.0),
    # additive Gaussian noise sigma as a fraction of the pixel range [0, 1] (0.05 ≈ 12.75 grey levels)
    "noise": (0.01, 0.02, 0.05, 0.1),
    # JPEG quality (`augment.jpeg_round_trip`, 4:2:0 chroma subsampling as cameras and scanners write it)
    "jpeg": (75, 50, 30, 10),
    # WebP lossy quality 1-100 (lower = stronger): another codec's artefacts (smoothed blocks, ringing) from a
    # viewer, a web archive or a cloud store that re-encodes
    "webp": (50, 30, 20),
    # downscale to this fraction of the side length, then upscale back (lower acquisition resolution)
    "scale": (0.75, 0.5, 0.33, 0.25),
    # magnification factor: > 1 crops the centre and enlarges it (a stronger objective), < 1 shrinks the image and
    # fills the border by reflection (a weaker one: more field of view)
    "magnification": (0.8, 0.9, 1.1, 1.25),
    # white balance: red / blue channel gain in linear light (another camera's or lamp's colour response)
    "red_gain": (0.8, 0.9, 1.1, 1.2),
    "blue_gain": (0.8, 0.9, 1.1, 1.2),
    # colour temperature: red ×(1 + s) and blue ×(1 - s) together (s > 0 warmer, s < 0 cooler)
    "colour_temperature": (-0.2, -0.1, 0.1, 0.2),
    # colour cast along green-magenta: green gain in linear light (a tinted lamp or filter)
    "tint": (0.85, 0.93, 1.07, 1.15),
    # exposure in linear light, highlights clip at white
    "exposure": (0.6, 0.8, 1.25, 1.5),
    # stain batch: both dyes' concentration ×factor (weaker / stronger staining)
    "stain_intensity": (0.6, 0.8, 1.25, 1.5),
    # stain batch: basic (blue) dye ×(1 + s), eosin ×(1 - s) (a bluer or a pinker stain)
    "stain_balance": (-0.3, -0.15, 0.15, 0.3),
    # another lab, all at once (`_other_lab`): s > 0 a warmer lamp, brighter exposure and a paler stain, s < 0 a
    # cooler lamp, darker exposure and a stronger stain; at |s| = 1 each part is milder than its own family's
    # strongest severity (colour temperature 0.15, exposure ×1.3, dyes ×0.75), together they are not
    "other_lab": (-1.0, -0.5, 0.5, 1.0),
    # the camera's tone curve: display value ** gamma (< 1 lifts the mid-tones, > 1 darkens them; black and white stay)
    "gamma": (0.7, 0.85, 1.2, 1.4),
    # uneven illumination: the light lost at the field's corners, falling off with the squared distance from the
    # centre in linear light (an unaligned condenser, a camera adapter's vignette); 0.5 = the corners get half
    "vignetting": (0.2, 0.35, 0.5),
    # the slide or stage moving during the exposure: a horizontal streak of this many pixels (at the scored size)
    "motion_blur": (3, 5, 9),
    # the camera's in-body sharpening: unsharp mask of this amount (σ 1 px): image + amount × (image − blurred)
    "sharpen": (0.5, 1.0, 2.0),
    # colour planes out of register (lateral chromatic aberration, a misaligned camera adapter): red moved this many
    # pixels right, blue as many left
    "channel_shift": (0.5, 1.0, 2.0),
    # a sensor's defective pixels: this fraction of pixels stuck black or white (dead and hot pixels)
    "impulse_noise": (0.001, 0.003, 0.01),
    # a dim lamp or a short exposure: photon (Poisson) noise with this many photons per pixel at white, so the noise
    # grows with the light (its spread is √(value × 255 / photons) grey levels); fewer photons = noisier
    "shot_noise": (200, 60, 20),
    # a low-resolution sensor shown without interpolation: means of this many × this many pixel tiles (at the
    # scored size), each repeated over its tile
    "pixelate": (2, 3, 4),
    # dust or debris on the slide, the coverslip or the camera's window: this many dark grey specks per field, discs
    # of radius 2-6 px at 224 px passing 2-20 % of the light (`augment.dust_light`), at random places
    "dust": (4, 8, 16),
    # the camera software's automatic levels: the darkest and brightest this % of the values clipped to black and
    # white and the rest stretched between them (all channels together; ImageJ's "Auto" clips 0.35 %)
    "auto_levels": (0.35, 1.0, 2.0),
}
"""Graded severities per perturbation, mildest first (for hue: by magnitude on each side of 0)."""

IDENTITY: dict[str, float] = {
    "hue": 0.0,
    "saturation": 1.0,
    "brightness": 1.0,
    "contrast": 1.0,
    "blur": 0.0,
    "noise": 0.0,
    "scale": 1.0,
    "magnification": 1.0,
    "red_gain": 1.0,
    "blue_gain": 1.0,
    "colour_temperature": 0.0,
    "tint": 1.0,
    "exposure": 1.0,
    "stain_intensity": 1.0,
    "stain_balance": 0.0,
    "other_lab": 0.0,
    "gamma": 1.0,
    "vignetting": 0.0,
    "motion_blur": 1.0,
    "sharpen": 0.0,
    "channel_shift": 0.0,
    "impulse_noise": 0.0,
    "shot_noise": math.inf,
    "pixelate": 1.0,
    "dust": 0.0,
}
"""The severity at which each perturbation leaves the image unchanged. JPEG and WebP have none: they are lossy at any
quality; nor has `auto_levels`: at 0 % it still stretches the darkest and brightest values to black and white."""


def iter_perturbations() -> list[tuple[str, float]]:
    """Every (name, severity) pair in the registry, in a stable order, for the robustness suite."""
    return [(name, severity) for name, severities in PERTURBATIONS.items() for severity in severities]


def _to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 NHWC numpy → uint8 NCHW tensor (a view, no copy), the layout torchvision ops take."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """uint8 NCHW tensor → a fresh uint8 NHWC array (always a copy: some ops return their input unchanged)."""
    return np.array(tensor.permute(0, 2, 3, 1).numpy(), order="C", copy=True)


def _rounded(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [0, 255] (or beyond) → uint8 NHWC numpy, rounded to the nearest level and clipped."""
    return _to_numpy(x.round().clamp(0, 255).to(torch.uint8))


def _check_range(name: str, severity: float, low: float, high: float) -> None:
    if not (low <= severity <= high):
        raise ValueError(f"{name} severity must be in [{low}, {high}], got {severity}")


def _hue(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    _check_range("hue", severity, -0.5, 0.5)
    return _to_numpy(F.adjust_hue(_to_tensor(batch), hue_factor=severity))


def _factor_op(name: str, op: Callable[[torch.Tensor, float], torch.Tensor]) -> Callable[[np.ndarray, float, int], np.ndarray]:
    def apply(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
        if not (severity >= 0 and math.isfinite(severity)):
            raise ValueError(f"{name} factor must be a finite number >= 0, got {severity}")
        return _to_numpy(op(_to_tensor(batch), severity))

    apply.__doc__ = f"{name} by a multiplicative factor (1 = unchanged)."
    return apply


def _blur(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    if not (severity >= 0 and math.isfinite(severity)):
        raise ValueError(f"blur sigma must be a finite number >= 0, got {severity}")
    if severity == 0:
        return batch.copy()
    height, width = batch.shape[1:3]
    # Kernel covers ±3 sigma (odd size), capped so reflect padding stays smaller than the image.
    kernel = 2 * math.ceil(3 * severity) + 1
    limit = 2 * min(height, width) - 1
    kernel = min(kernel, limit if limit % 2 == 1 else limit - 1)
    return _to_numpy(F.gaussian_blur(_to_tensor(batch), kernel_size=[kernel, kernel], sigma=[severity, severity]))


def _noise(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    _check_range("noise", severity, 0.0, 1.0)
    if severity == 0:
        return batch.copy()
    rng = np.random.default_rng(seed)
    noisy = batch.astype(np.float32) + rng.normal(0.0, severity * 255.0, size=batch.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _quality(name: str, severity: float) -> int:
    """A codec's quality: a whole number in [1, 100] (NaN and infinities named like any other bad value)."""
    if not (math.isfinite(severity) and severity == int(severity) and 1 <= severity <= 100):
        raise ValueError(f"{name} quality must be an integer in [1, 100], got {severity:g}")
    return int(severity)


def _jpeg(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    quality = _quality("jpeg", severity)
    if len(batch) == 0:
        return batch.copy()
    return _to_numpy(torch.stack(jpeg_round_trip(_to_tensor(batch), quality)))


def _webp(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    quality = _quality("webp", severity)
    if len(batch) == 0:
        return batch.copy()
    return _to_numpy(torch.stack(webp_round_trip(_to_tensor(batch), quality)))


def _scale(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    if not (0 < severity <= 1):
        raise ValueError(f"scale factor must be in (0, 1], got {severity}")
    if severity == 1:
        return batch.copy()
    height, width = batch.shape[1:3]
    small = [max(1, round(height * severity)), max(1, round(width * severity))]
    tensor = _to_tensor(batch)
    down = F.resize(tensor, small, interpolation=InterpolationMode.BILINEAR, antialias=True)
    up = F.resize(down, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return _to_numpy(up)


def _magnification(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    _check_range("magnification", severity, 0.5, 2.0)
    if severity == 1:
        return batch.copy()
    height, width = batch.shape[1:3]
    tensor = _to_tensor(batch)
    if severity > 1:
        crop = [max(1, round(height / severity)), max(1, round(width / severity))]
        out = F.resize(F.center_crop(tensor, crop), [height, width], interpolation=InterpolationMode.BILINEAR,
                       antialias=True)
    else:
        small = [max(1, round(height * severity)), max(1, round(width * severity))]
        out = F.resize(tensor, small, interpolation=InterpolationMode.BILINEAR, antialias=True)
        top, left = (height - small[0]) // 2, (width - small[1]) // 2
        # reflect padding needs float input in torch; values stay exact uint8 levels
        out = F.pad(out.float(), [left, top, width - small[1] - left, height - small[0] - top],
                    padding_mode="reflect").round().to(torch.uint8)
    return _to_numpy(out)


def _colour_op(name: str, low: float, high: float,
               op: Callable[[torch.Tensor, float], torch.Tensor]) -> Callable[[np.ndarray, float, int], np.ndarray]:
    """A `leukray.colour` transform at a fixed severity, on uint8 NHWC in and out (rounded to the nearest level)."""
    def apply(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
        _check_range(name, severity, low, high)
        x = _to_tensor(batch).to(torch.float32) / 255.0
        return _rounded(op(x, severity) * 255.0)

    return apply


def _gains(r: float, g: float, b: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: colour.camera_gains(x, torch.tensor([r, g, b], dtype=x.dtype).expand(x.shape[0], 3))


def _other_lab(x: torch.Tensor, s: float) -> torch.Tensor:
    """Stain batch, lamp and exposure of another lab together: dyes ×0.75^s, then red ×1.15^s and blue ×0.85^s
    (colour temperature) and all three ×1.3^s (exposure, clipped) in linear light."""
    stained = colour.stain_concentration(x, 0.75 ** s, 0.75 ** s)
    return _gains(1.15 ** s * 1.3 ** s, 1.3 ** s, 0.85 ** s * 1.3 ** s)(stained)


def _gamma(x: torch.Tensor, g: float) -> torch.Tensor:
    return x.clamp(0, 1) ** g


def _vignetting(x: torch.Tensor, loss: float) -> torch.Tensor:
    """Multiply the light by 1 - loss × r² (r = distance from the centre, 1 at the corners), in linear light."""
    h, w = x.shape[-2:]
    yy = torch.linspace(-1.0, 1.0, h, dtype=x.dtype).view(h, 1)
    xx = torch.linspace(-1.0, 1.0, w, dtype=x.dtype).view(1, w)
    light = 1.0 - loss * (yy ** 2 + xx ** 2) / 2.0
    return colour.scale_light(x, light)


def _whole_pixels(name: str, what: str, severity: float, high: int) -> int:
    pixels = int(severity)
    if pixels != severity or not 1 <= pixels <= high:
        raise ValueError(f"{name} {what} must be a whole number of pixels in [1, {high}], got {severity}")
    return pixels


def _motion_blur(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    length = _whole_pixels("motion_blur", "length", severity, 63)
    if length == 1:
        return batch.copy()
    return _rounded(motion_streak(_to_tensor(batch).float(), length))


def _sharpen(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    _check_range("sharpen", severity, 0.0, 10.0)
    if severity == 0:
        return batch.copy()
    x = _to_tensor(batch).float()
    blurred = F.gaussian_blur(x, kernel_size=[7, 7], sigma=[1.0, 1.0])
    return _rounded(x + severity * (x - blurred))


def _channel_shift(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    _check_range("channel_shift", severity, 0.0, 8.0)
    if severity == 0:
        return batch.copy()
    x = _to_tensor(batch).float()
    red, blue = shift_plane(x[:, 0], severity, 0.0), shift_plane(x[:, 2], -severity, 0.0)
    return _rounded(torch.stack([red, x[:, 1], blue], 1))


def _impulse_noise(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    _check_range("impulse_noise", severity, 0.0, 0.5)
    out = batch.copy()
    if severity == 0:
        return out
    u = np.random.default_rng(seed).random(batch.shape[:3])
    out[u < severity / 2] = 0
    out[u > 1 - severity / 2] = 255
    return out


def _shot_noise(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    _check_range("shot_noise", severity, 1.0, math.inf)
    if severity == math.inf:
        return batch.copy()
    photons = np.random.default_rng(seed).poisson(batch.astype(np.float64) * (severity / 255.0))
    return np.clip(np.rint(photons * (255.0 / severity)), 0, 255).astype(np.uint8)


def _pixelate(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    block = _whole_pixels("pixelate", "tile", severity, 32)
    if block == 1:
        return batch.copy()
    return _rounded(pixelate(_to_tensor(batch).float(), block))


DUST_PASSED = (0.02, 0.2)
"""The fraction of the light each speck of the `dust` family passes: dark debris, which a network reads as nuclei."""


def _dust(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    count = int(severity)
    if count != severity or not 0 <= count <= 1000:
        raise ValueError(f"dust must be a whole number of specks in [0, 1000], got {severity}")
    if count == 0:
        return batch.copy()
    x = _to_tensor(batch).float() / 255.0
    light = dust_light(x.shape[0], x.shape[2], x.shape[3], count, torch.Generator().manual_seed(seed),
                       passed=DUST_PASSED)
    return _rounded(colour.scale_light(x, light) * 255.0)


def _auto_levels(batch: np.ndarray, severity: float, seed: int) -> np.ndarray:
    _check_range("auto_levels", severity, 0.0, 25.0)
    if len(batch) == 0:
        return batch.copy()
    return _rounded(auto_levels(_to_tensor(batch).float(), severity))


_OPS: dict[str, Callable[[np.ndarray, float, int], np.ndarray]] = {
    "hue": _hue,
    "saturation": _factor_op("saturation", F.adjust_saturation),
    "brightness": _factor_op("brightness", F.adjust_brightness),
    "contrast": _factor_op("contrast", F.adjust_contrast),
    "blur": _blur,
    "noise": _noise,
    "jpeg": _jpeg,
    "webp": _webp,
    "scale": _scale,
    "magnification": _magnification,
    "red_gain": _colour_op("red_gain", 0.25, 4.0, lambda x, s: _gains(s, 1.0, 1.0)(x)),
    "blue_gain": _colour_op("blue_gain", 0.25, 4.0, lambda x, s: _gains(1.0, 1.0, s)(x)),
    "colour_temperature": _colour_op("colour_temperature", -0.75, 0.75, lambda x, s: _gains(1 + s, 1.0, 1 - s)(x)),
    "tint": _colour_op("tint", 0.25, 4.0, lambda x, s: _gains(1.0, s, 1.0)(x)),
    "exposure": _colour_op("exposure", 0.1, 10.0, colour.exposure),
    "stain_intensity": _colour_op("stain_intensity", 0.0, 5.0, lambda x, s: colour.stain_concentration(x, s, s)),
    "stain_balance": _colour_op("stain_balance", -0.9, 0.9,
                                lambda x, s: colour.stain_concentration(x, 1 + s, 1 - s)),
    "other_lab": _colour_op("other_lab", -3.0, 3.0, _other_lab),
    "gamma": _colour_op("gamma", 0.25, 4.0, _gamma),
    "vignetting": _colour_op("vignetting", 0.0, 0.9, _vignetting),
    "motion_blur": _motion_blur,
    "sharpen": _sharpen,
    "channel_shift": _channel_shift,
    "impulse_noise": _impulse_noise,
    "shot_noise": _shot_noise,
    "pixelate": _pixelate,
    "dust": _dust,
    "auto_levels": _auto_levels,
}
assert _OPS.keys() == PERTURBATIONS.keys() == IDENTITY.keys() | {"jpeg", "webp", "auto_levels"}


def apply_perturbation(batch: np.ndarray, name: str, severity: float, seed: int = 0) -> np.ndarray:
    """Apply perturbation `name` at `severity` to a uint8 RGB NHWC batch (or one HWC image).

    Returns a new array with the same dtype and shape; the input is never modified. Deterministic for a given seed
    (only `noise`, `shot_noise`, `impulse_noise` and `dust` use it). Raises ValueError for an unknown name (listing the
    allowed ones), an out-of-range severity, or an input that is not uint8 RGB.
    """
    if name not in _OPS:
        raise ValueError(f"unknown perturbation {name!r}; allowed: {', '.join(sorted(_OPS))}")
    array = np.asarray(batch)
    if array.dtype != np.uint8:
        raise ValueError(f"perturbations take uint8 images (decode_image output), got dtype {array.dtype}")
    single = array.ndim == 3
    if single:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB NHWC (N, H, W, 3) or HWC (H, W, 3), got shape {np.asarray(batch).shape}")
    if not (array.flags.c_contiguous and array.flags.writeable):
        array = np.array(array, order="C", copy=True)  # torch.from_numpy needs a writable, contiguous buffer
    out = _OPS[name](array, float(severity), int(seed))
    assert out.dtype == np.uint8 and out.shape == array.shape
    return out[0] if single else out


DEGRADATIONS: dict[str, tuple[float, float]] = {
    "blur": (1.5, 3.0), "noise": (0.04, 0.1), "shot_noise": (20, 100), "jpeg": (10, 30), "pixelate": (2, 4),
    "motion_blur": (5, 9), "scale": (0.25, 0.5), "brightness": (1.15, 1.4), "other_lab": (0.5, 1.0),
}
"""The camera and lab defects leukray is meant to answer through, from moderate to the suite's strongest severity
(the README's results): what `degraded_copy` draws from for the guard's reference (`ood.degraded_copies`). Integer
bounds draw whole-number severities (photons, JPEG quality, pixels)."""


def degraded_copy(images: np.ndarray, seed: int, chunk: int = 8) -> np.ndarray:
    """uint8 NHWC images → one copy of each under one defect of `DEGRADATIONS`, family and severity drawn per chunk
    of `chunk` images (seeded): training images as a camera at the edge of the declared range records them."""
    rng = np.random.default_rng(seed)
    names = list(DEGRADATIONS)
    out = np.empty_like(images)
    for start in range(0, len(images), chunk):
        name = names[int(rng.integers(len(names)))]
        low, high = DEGRADATIONS[name]
        severity = int(rng.integers(low, high + 1)) if isinstance(low, int) else float(rng.uniform(low, high))
        out[start:start + chunk] = apply_perturbation(images[start:start + chunk], name, severity,
                                                      seed=int(rng.integers(2**31)))
    return out

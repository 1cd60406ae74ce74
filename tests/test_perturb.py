"""Perturbations: deterministic per seed, identity at the neutral severity, graded, dtype/shape preserved."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from leukray.perturb import IDENTITY, PERTURBATIONS, apply_perturbation, iter_perturbations


def _smear_like(n: int = 2, size: int = 48, seed: int = 0) -> np.ndarray:
    """Pinkish background with purple 'cells' and mild texture: colourful and structured, like a smear."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    batch = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:] = (205, 160, 170)
        for _ in range(4):
            cy, cx, r = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(4, 9)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            img[mask] = (110, 60, 150)
        img += rng.normal(0, 6, size=img.shape)
        batch[i] = np.clip(img, 0, 255).astype(np.uint8)
    return batch


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


BATCH = _smear_like()


def test_registry_contains_required_severities() -> None:
    assert set(PERTURBATIONS) == {"hue", "saturation", "brightness", "contrast", "blur", "noise", "jpeg", "scale",
                                 "magnification", "red_gain", "blue_gain", "colour_temperature", "tint", "exposure",
                                 "stain_intensity", "stain_balance", "other_lab", "gamma", "vignetting",
                                 "motion_blur", "sharpen", "channel_shift", "impulse_noise", "shot_noise",
                                 "pixelate", "dust", "auto_levels", "webp"}
    assert -0.05 in PERTURBATIONS["hue"]
    assert {0.8, 1.2} <= set(PERTURBATIONS["red_gain"]) and {0.8, 1.2} <= set(PERTURBATIONS["blue_gain"])
    assert {-0.2, 0.2} <= set(PERTURBATIONS["colour_temperature"])
    assert {0.6, 1.5} <= set(PERTURBATIONS["exposure"])
    assert 2 in PERTURBATIONS["blur"]
    assert 10 in PERTURBATIONS["jpeg"]
    assert 0.05 in PERTURBATIONS["noise"]
    assert all(3 <= len(v) <= 6 for v in PERTURBATIONS.values())
    assert len(iter_perturbations()) == sum(len(v) for v in PERTURBATIONS.values())


@pytest.mark.parametrize(("name", "severity"), iter_perturbations())
def test_dtype_shape_and_input_untouched(name: str, severity: float) -> None:
    before = BATCH.copy()
    out = apply_perturbation(BATCH, name, severity, seed=0)
    assert out.dtype == np.uint8
    assert out.shape == BATCH.shape
    assert not np.shares_memory(out, BATCH)
    np.testing.assert_array_equal(BATCH, before)
    assert _diff(out, BATCH) > 0.1  # every registered severity actually does something


@pytest.mark.parametrize(("name", "severity"), iter_perturbations())
def test_deterministic_for_a_seed(name: str, severity: float) -> None:
    a = apply_perturbation(BATCH, name, severity, seed=7)
    b = apply_perturbation(BATCH, name, severity, seed=7)
    np.testing.assert_array_equal(a, b)


def test_noise_differs_between_seeds() -> None:
    a = apply_perturbation(BATCH, "noise", 0.05, seed=1)
    b = apply_perturbation(BATCH, "noise", 0.05, seed=2)
    assert not np.array_equal(a, b)
    # sigma 0.05 of the range ≈ 12.75 grey levels; mean |N(0, s)| = s*sqrt(2/pi) ≈ 10.2 (a little less after clipping)
    assert 8.0 < _diff(a, BATCH) < 11.0


@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_identity_severity_leaves_image_unchanged(name: str) -> None:
    out = apply_perturbation(BATCH, name, IDENTITY[name], seed=3)
    assert _diff(out, BATCH) <= 0.5  # exact for most; rounding in colour-space round trips at most


def test_high_quality_jpeg_is_nearly_unchanged() -> None:
    # Per-pixel chroma texture is lost to 4:2:0 subsampling even at q95, so compare against q10's damage.
    mild = _diff(apply_perturbation(BATCH, "jpeg", 95), BATCH)
    strong = _diff(apply_perturbation(BATCH, "jpeg", 10), BATCH)
    assert mild < 6.0
    assert mild < 0.6 * strong


def test_webp_is_a_real_webp_round_trip() -> None:
    """Each image goes through libwebp at the asked quality on its own (the pixels of PIL's encode and decode); a
    high quality is close to the original and closer than a low one (per-pixel chroma texture is lost to 4:2:0
    subsampling at any quality, as in JPEG)."""
    out = apply_perturbation(BATCH, "webp", 30)
    for image, got in zip(BATCH, out):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "WEBP", quality=30)
        np.testing.assert_array_equal(got, np.asarray(Image.open(buffer).convert("RGB")))
    mild = _diff(apply_perturbation(BATCH, "webp", 95), BATCH)
    assert 0 < mild < 6.0 and mild < 0.7 * _diff(apply_perturbation(BATCH, "webp", 10), BATCH)
    assert apply_perturbation(BATCH[:0], "webp", 20).shape == BATCH[:0].shape


def _graded(name: str) -> list[list[float]]:
    """Severities ordered from mild to strong, on each side of the identity where both sides exist."""
    severities = PERTURBATIONS[name]
    if name in ("jpeg", "webp"):
        return [sorted(severities, reverse=True)]
    if name == "auto_levels":
        return [sorted(severities)]
    ident = IDENTITY[name]
    below = sorted((s for s in severities if s < ident), reverse=True)
    above = sorted(s for s in severities if s > ident)
    return [side for side in (below, above) if len(side) >= 2]


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_larger_severity_changes_more(name: str) -> None:
    sides = _graded(name)
    assert sides
    for side in sides:
        diffs = [_diff(apply_perturbation(BATCH, name, s, seed=0), BATCH) for s in side]
        assert diffs == sorted(diffs), f"{name}: {list(zip(side, diffs))}"
        assert diffs[-1] > diffs[0]


def test_single_hwc_image_and_readonly_input() -> None:
    image = BATCH[0].copy()
    image.flags.writeable = False
    out = apply_perturbation(image, "blur", 2.0)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, apply_perturbation(BATCH, "blur", 2.0)[0])


def test_unknown_name_names_bad_value_and_allowed() -> None:
    with pytest.raises(ValueError) as err:
        apply_perturbation(BATCH, "fog", 0.5)
    message = str(err.value)
    assert "'fog'" in message
    for allowed in PERTURBATIONS:
        assert allowed in message


@pytest.mark.parametrize(
    ("name", "severity"),
    [("hue", 0.6), ("noise", 1.5), ("blur", -1.0), ("jpeg", 0), ("jpeg", 50.5), ("scale", 0.0), ("contrast", -0.1),
     ("magnification", 0.4), ("magnification", 2.5), ("gamma", 0.1), ("vignetting", 1.0), ("vignetting", -0.2),
     ("motion_blur", 2.5), ("motion_blur", 0), ("sharpen", -1.0), ("channel_shift", 9.0), ("impulse_noise", 0.6),
     ("shot_noise", 0.5), ("shot_noise", math.nan), ("pixelate", 2.5), ("pixelate", 0), ("dust", 2.5), ("dust", -1),
     ("auto_levels", -0.5), ("auto_levels", 30), ("webp", 0), ("webp", 20.5), ("webp", 101),
     ("webp", math.nan), ("jpeg", math.inf)],
)
def test_out_of_range_severity(name: str, severity: float) -> None:
    with pytest.raises(ValueError, match=name):
        apply_perturbation(BATCH, name, severity)


def test_rejects_non_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        apply_perturbation(BATCH.astype(np.float32), "hue", 0.05)
    with pytest.raises(ValueError, match="NHWC"):
        apply_perturbation(BATCH.transpose(0, 3, 1, 2).copy(), "hue", 0.05)


def test_magnification_changes_the_size_of_a_cell() -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    image = np.full((1, 64, 64, 3), 230, dtype=np.uint8)
    image[0][(yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 10 ** 2] = (90, 40, 140)  # one centred cell

    def area(b: np.ndarray) -> float:
        return float((b[0, :, :, 0] < 160).sum())

    base = area(image)
    assert area(apply_perturbation(image, "magnification", 1.25)) == pytest.approx(base * 1.25 ** 2, rel=0.1)
    assert area(apply_perturbation(image, "magnification", 0.8)) == pytest.approx(base * 0.8 ** 2, rel=0.1)


def test_red_gain_moves_red_only_and_clips_at_white() -> None:
    image = np.array([[[100, 100, 100], [250, 120, 200]]], dtype=np.uint8)
    up = apply_perturbation(image, "red_gain", 1.2)
    # linear light: (100/255)^2.2 * 1.2, back to display: 100 * 1.2^(1/2.2) = 108.6
    assert up[0, 0].tolist() == [109, 100, 100]
    assert up[0, 1].tolist() == [255, 120, 200]  # 250 * 1.086 clips at the sensor's white
    down = apply_perturbation(image, "red_gain", 0.8)
    assert down[0, 0, 0] == round(100 * 0.8 ** (1 / 2.2)) and down[0, 0, 1:].tolist() == [100, 100]


def test_colour_temperature_is_red_up_blue_down() -> None:
    image = np.full((1, 2, 2, 3), 128, np.uint8)
    warm = apply_perturbation(image, "colour_temperature", 0.2)
    assert warm[0, 0, 0, 0] > 128 and warm[0, 0, 0, 1] == 128 and warm[0, 0, 0, 2] < 128
    cool = apply_perturbation(image, "colour_temperature", -0.2)
    assert cool[0, 0, 0, 0] < 128 and cool[0, 0, 0, 2] > 128


def test_other_lab_is_its_parts_together() -> None:
    image = np.array([[[230, 225, 235], [110, 60, 150]]], dtype=np.uint8)
    warm, cool = (apply_perturbation(image, "other_lab", s).astype(int) for s in (1.0, -1.0))
    paler = apply_perturbation(image, "stain_intensity", 0.75).astype(int)
    image = image.astype(int)
    assert warm[0, 1].sum() > paler[0, 1].sum() > image[0, 1].sum()  # paler stain, then brighter exposure
    assert warm[0, 1, 0] - warm[0, 1, 2] > image[0, 1, 0] - image[0, 1, 2]  # warmer: red up relative to blue
    assert cool[0, 1].sum() < image[0, 1].sum() and cool[0, 1, 2] - cool[0, 1, 0] > image[0, 1, 2] - image[0, 1, 0]
    assert warm[0, 0, :2].tolist() == [255, 255]  # the bright background clips at white


def test_exposure_clips_highlights_and_cannot_be_undone() -> None:
    image = np.clip(BATCH.astype(int) + 40, 0, 255).astype(np.uint8)  # a bright background, as smears have
    bright = apply_perturbation(image, "exposure", 1.5)
    back = apply_perturbation(bright, "exposure", 1 / 1.5)
    dark = apply_perturbation(image, "exposure", 0.6)
    assert (bright >= image).all()
    # the darkened image comes back to within rounding; the clipped one does not
    assert _diff(apply_perturbation(dark, "exposure", 1 / 0.6), image) < 1.0
    assert _diff(back, image) > 5 * _diff(apply_perturbation(dark, "exposure", 1 / 0.6), image)


def test_stain_leaves_white_background_and_scales_stained_pixels() -> None:
    image = np.array([[[255, 255, 255], [110, 60, 150]]], dtype=np.uint8)
    strong = apply_perturbation(image, "stain_intensity", 1.5)
    weak = apply_perturbation(image, "stain_intensity", 0.6)
    assert strong[0, 0].tolist() == [255, 255, 255] == weak[0, 0].tolist()
    assert (strong[0, 1].astype(int) <= image[0, 1]).all() and strong[0, 1].sum() < image[0, 1].sum()
    assert (weak[0, 1].astype(int) >= image[0, 1]).all() and weak[0, 1].sum() > image[0, 1].sum()
    bluer = apply_perturbation(image, "stain_balance", 0.3)[0, 1].astype(int)
    pinker = apply_perturbation(image, "stain_balance", -0.3)[0, 1].astype(int)
    # the basic dye absorbs red most: a bluer stain is darker in red and bluer relative to red
    assert bluer[0] < pinker[0] and bluer[2] - bluer[0] > pinker[2] - pinker[0]


def test_gamma_keeps_black_and_white_and_moves_mid_tones() -> None:
    ramp = np.repeat(np.linspace(0, 255, 16).round().astype(np.uint8)[None, :, None], 3, axis=2)[None]
    lifted, darkened = (apply_perturbation(ramp, "gamma", g)[0, 0, :, 0].astype(int) for g in (0.7, 1.4))
    assert lifted[0] == darkened[0] == 0 and lifted[-1] == darkened[-1] == 255
    mid = ramp[0, 0, 1:-1, 0].astype(int)
    assert (lifted[1:-1] > mid).all() and (darkened[1:-1] < mid).all()
    assert abs(lifted[8] - round(255 * (136 / 255) ** 0.7)) <= 1


def test_vignetting_darkens_the_corners_not_the_centre() -> None:
    grey = np.full((1, 65, 65, 3), 200, np.uint8)
    out = apply_perturbation(grey, "vignetting", 0.5)[0, ..., 0].astype(int)
    assert out[32, 32] == 200
    # the corners get half the light (linear): 200 → 255 × (0.5 × (200/255)^2.2)^(1/2.2)
    expected = round(255 * (0.5 * (200 / 255) ** 2.2) ** (1 / 2.2))
    assert all(abs(out[y, x] - expected) <= 1 for y, x in [(0, 0), (0, 64), (64, 0), (64, 64)])
    assert out[32, 0] > expected and out[32, 0] < 200  # the edges' midpoints lose half as much


def _edge(size: int = 16) -> np.ndarray:
    """A grey field, its right half white: one vertical edge."""
    image = np.full((1, size, size, 3), 100, np.uint8)
    image[:, :, size // 2:] = 255
    return image


def test_motion_blur_streaks_along_rows_only() -> None:
    image = np.full((1, 15, 15, 3), 200, np.uint8)
    image[0, 7, 7] = 20  # one dark dot
    out = apply_perturbation(image, "motion_blur", 5)
    np.testing.assert_array_equal(out[0, 7, 5:10, 0], [164] * 5)  # 200 - 180 / 5 over the 5 pixels of its row
    np.testing.assert_array_equal(out[0, 6], image[0, 6])  # rows above and below untouched
    np.testing.assert_array_equal(out[0, 7, :5], image[0, 7, :5])


def test_sharpen_overshoots_at_an_edge_and_keeps_flat_areas() -> None:
    out = apply_perturbation(_edge(), "sharpen", 1.0).astype(int)
    assert out[0, 8, 7, 0] < 100 and out[0, 8, 8, 0] == 255  # dark side darker; the bright side clips at white
    assert out[0, 8, 2, 0] == 100 and out[0, 8, 14, 0] == 255  # away from the edge: unchanged


def test_channel_shift_moves_red_right_blue_left_green_stays() -> None:
    image = _edge()
    out = apply_perturbation(image, "channel_shift", 1.0)
    np.testing.assert_array_equal(out[..., 1], image[..., 1])
    assert out[0, 0, 8, 0] == 100 and out[0, 0, 9, 0] == 255  # red's edge one pixel to the right
    assert out[0, 0, 7, 2] == 255 and out[0, 0, 6, 2] == 100  # blue's one pixel to the left
    half = apply_perturbation(image, "channel_shift", 0.5)
    assert half[0, 0, 8, 0] == 178  # half a pixel: halfway between 100 and 255


def test_impulse_noise_sticks_that_fraction_of_pixels_black_or_white() -> None:
    image = np.full((4, 100, 100, 3), 128, np.uint8)
    out = apply_perturbation(image, "impulse_noise", 0.01, seed=5)
    stuck_black = (out == 0).all(-1).mean()
    stuck_white = (out == 255).all(-1).mean()
    assert 0.004 < stuck_black < 0.006 and 0.004 < stuck_white < 0.006
    assert ((out == 128).all(-1) | (out == 0).all(-1) | (out == 255).all(-1)).all()  # whole pixels, the rest kept
    assert not np.array_equal(out, apply_perturbation(image, "impulse_noise", 0.01, seed=6))


def test_shot_noise_grows_with_the_light_and_keeps_black() -> None:
    image = np.zeros((2, 100, 100, 3), np.uint8)
    image[:, :, :50] = 64
    image[:, :, 50:] = 144
    out = apply_perturbation(image, "shot_noise", 20, seed=1).astype(float)
    dark, bright = out[:, :, 10:40], out[:, :, 60:90]
    # Poisson: mean kept, spread sqrt(value x 255 / photons) grey levels: 28.6 at 64, 42.8 at 144 (x 1.5 = sqrt 2.25)
    assert abs(dark.mean() - 64) < 1.5 and 27 < dark.std() < 30.5
    assert abs(bright.mean() - 144) < 2 and 40 < bright.std() < 45
    np.testing.assert_array_equal(apply_perturbation(np.zeros_like(image), "shot_noise", 20), 0)  # no light, no noise
    assert not np.array_equal(out, apply_perturbation(image, "shot_noise", 20, seed=2))


def test_pixelate_averages_tiles_and_repeats_them() -> None:
    image = np.zeros((1, 5, 5, 3), np.uint8)
    image[0, 0, 0] = 200  # one bright pixel in the first 2 x 2 tile
    image[0, 4, 4] = 100  # the last, partial tile holds only this pixel
    out = apply_perturbation(image, "pixelate", 2)
    np.testing.assert_array_equal(out[0, :2, :2, 0], [[50, 50], [50, 50]])
    assert out[0, 4, 4, 0] == 100 and (out[0, 2:4, 2:4] == 0).all()


def test_degraded_copy_draws_one_declared_defect_per_chunk() -> None:
    """`degraded_copy`: seeded, input untouched, each chunk of 8 images under one defect of `DEGRADATIONS` at a
    severity inside its range — every chunk equals `apply_perturbation` of one (family, severity) in range."""
    from leukray.perturb import DEGRADATIONS, degraded_copy

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 24, 24, 3), dtype=np.uint8)
    before = images.copy()
    copy = degraded_copy(images, seed=4)
    np.testing.assert_array_equal(images, before)
    np.testing.assert_array_equal(copy, degraded_copy(images, seed=4))
    assert copy.dtype == np.uint8 and copy.shape == images.shape and not np.array_equal(copy, degraded_copy(images, 5))
    # replay the draws: each chunk is one family at one severity inside the declared range
    draws = np.random.default_rng(4)
    names = list(DEGRADATIONS)
    for start in range(0, 32, 8):
        name = names[int(draws.integers(len(names)))]
        low, high = DEGRADATIONS[name]
        whole = name in ("shot_noise", "jpeg", "pixelate", "motion_blur")
        severity = int(draws.integers(low, high + 1)) if whole else float(draws.uniform(low, high))
        assert low <= severity <= high
        np.testing.assert_array_equal(copy[start:start + 8], apply_perturbation(
            images[start:start + 8], name, severity, seed=int(draws.integers(2**31))))


def test_dust_darkens_specks_only_and_differs_between_seeds() -> None:
    """Dust takes light away (in linear light) from a few small discs: the rest of the field keeps its values to the
    level, no pixel gets brighter, and another seed puts the specks elsewhere."""
    field = np.full((4, 224, 224, 3), (230, 200, 210), dtype=np.uint8)
    out = apply_perturbation(field, "dust", 8, seed=1)
    darker = (out.astype(int) < field.astype(int)).any(-1)
    assert (out <= field).all()
    # 8 discs of radius 2-6 px each (edges anti-aliased): 100-900 px of the 50 176, fewer where two overlap
    assert 0.001 < darker.mean() < 0.02
    assert int(out.min()) < 0.55 * 200  # a speck passes 2-20 % of the light: far darker than the field
    assert not np.array_equal(out, apply_perturbation(field, "dust", 8, seed=2))
    np.testing.assert_array_equal(apply_perturbation(field, "dust", 0, seed=1), field)


def test_auto_levels_clips_the_chosen_fraction_at_each_end() -> None:
    """The darkest and brightest `severity` % of the values end at black and white; the order of values is kept."""
    ramp = np.broadcast_to(np.arange(100, 200, dtype=np.uint8).reshape(1, 10, 10, 1), (1, 10, 10, 3)).copy()
    out = apply_perturbation(ramp, "auto_levels", 2.0)
    assert (out == 0).mean() == pytest.approx(0.03) and (out == 255).mean() == pytest.approx(0.03)
    flat = out[0, ..., 0].ravel()
    assert (np.diff(flat.astype(int)) >= 0).all()  # the ramp stays a ramp
    whole = apply_perturbation(ramp, "auto_levels", 0.0)
    assert whole.min() == 0 and whole.max() == 255  # 0 %: the darkest value to black, the brightest to white

import numpy as np
import pytest
import torch

from leukray.augment import POLICIES, augment_batch


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_keep_shape_and_range_and_are_seeded(policy):
    x = torch.rand(6, 3, 32, 32) * 255
    a = augment_batch(x.clone(), policy, torch.Generator().manual_seed(3))
    b = augment_batch(x.clone(), policy, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0 and float(a.max()) <= 255
    assert torch.equal(a, b)
    if policy == "none":
        assert torch.equal(a, x)
    else:
        assert not torch.allclose(a, x)


def test_stain_changes_colour_not_only_geometry():
    x = torch.zeros(8, 3, 16, 16)
    x[:, 0] = 200; x[:, 1] = 80; x[:, 2] = 160  # a flat purple field: flips/rotations cannot change it
    y = augment_batch(x.clone(), "stain", torch.Generator().manual_seed(0))
    assert float((y - x).abs().mean()) > 5


def test_unknown_policy_lists_allowed():
    allowed = "none, study, stain, robust, lab, lab_defects, lab_sensor, lab_dust_levels"
    with pytest.raises(ValueError, match=f"augment='heavy'.*{allowed}"):
        augment_batch(torch.zeros(1, 3, 8, 8), "heavy")


def _disk_areas(zoom: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disk = (((yy - 31.5) ** 2 + (xx - 31.5) ** 2) < 8 ** 2).float() * 255
    x = disk.expand(32, 3, 64, 64).clone()
    y = augment_batch(x, "study", torch.Generator().manual_seed(1), zoom=zoom)
    return (y[:, 0] > 127).float().sum(dim=(1, 2)) / float((disk > 127).sum())


def test_zoom_magnifies_within_its_range():
    plain = _disk_areas(1.0)
    assert float(plain.min()) > 0.9 and float(plain.max()) < 1.1  # flips/rotations keep a centred disk's area
    zoomed = _disk_areas(2.0)
    # linear factor in [1/2, 2] → area in [1/4, 4]; 32 draws reach well into both ends
    assert float(zoomed.min()) >= 0.2 and float(zoomed.max()) <= 4.4
    assert float(zoomed.min()) < 0.6 and float(zoomed.max()) > 2.0


def test_zoom_below_one_is_refused():
    with pytest.raises(ValueError, match="zoom must be >= 1.0"):
        augment_batch(torch.zeros(1, 3, 8, 8), "study", zoom=0.5)


def test_p_is_the_fraction_of_images_with_colour_and_camera_augmentation():
    x = torch.rand(64, 3, 16, 16) * 255
    study = augment_batch(x.clone(), "study", torch.Generator().manual_seed(5))
    # p=0: flips/rotations alone, the same draws as the study policy; p=1: the policy as before (the default)
    assert torch.equal(augment_batch(x.clone(), "robust", torch.Generator().manual_seed(5), p=0.0), study)
    assert torch.equal(augment_batch(x.clone(), "robust", torch.Generator().manual_seed(5), p=1.0),
                       augment_batch(x.clone(), "robust", torch.Generator().manual_seed(5)))
    half = augment_batch(x.clone(), "robust", torch.Generator().manual_seed(5), p=0.5)
    assert torch.equal(half, augment_batch(x.clone(), "robust", torch.Generator().manual_seed(5), p=0.5))
    untouched = (half == study).flatten(1).all(1)  # these images kept their flipped/rotated pixels exactly
    assert 16 <= int(untouched.sum()) <= 48
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        augment_batch(x, "robust", p=1.5)


def test_lab_policy_moves_channels_independently():
    """Another lab's camera: per-channel gains, so the red/blue balance of a flat grey field moves image to image
    (hue/saturation jitter alone keeps a grey field grey), within the drawn ranges."""
    from leukray.augment import colour_response

    x = torch.full((64, 3, 8, 8), 128.0)
    y = colour_response(x, torch.Generator().manual_seed(2))
    ratio = (y[:, 0] / y[:, 2]).mean(dim=(1, 2))
    assert float(ratio.std()) > 0.05
    assert float(ratio.min()) > 0.5 and float(ratio.max()) < 2.0
    exposure = y.mean(dim=(1, 2, 3)) / 128.0
    assert float(exposure.min()) < 0.9 and float(exposure.max()) > 1.1


def test_augment_images_is_seeded_uint8_and_keeps_geometry_per_image():
    import numpy as np

    from leukray.augment import augment_images

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    a = augment_images(images, "lab", seed=7)
    assert a.dtype == np.uint8 and a.shape == images.shape
    np.testing.assert_array_equal(a, augment_images(images, "lab", seed=7))
    assert not np.array_equal(a, augment_images(images, "lab", seed=8))
    np.testing.assert_array_equal(augment_images(images, "none", seed=7), images)


def test_lab_defects_is_lab_then_the_optics_defects():
    """The policy adds to `lab` without changing it: the same draws, then the defects."""
    from leukray.augment import optics_defects

    x = torch.rand(16, 3, 32, 32) * 255
    g_lab, g_defects = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    lab = augment_batch(x.clone(), "lab", g_lab)
    expected = optics_defects(lab, g_lab).clamp(0, 255)
    assert torch.equal(augment_batch(x.clone(), "lab_defects", g_defects), expected)
    assert not torch.equal(expected, lab)


def test_lab_sensor_is_lab_then_the_sensor_defects_and_never_brightens():
    """`lab_sensor` adds the sensor defects to `lab` with `lab`'s draws unchanged; on a flat field it only adds
    noise and stuck pixels: no glare or display gain lifts a whole image."""
    from leukray.augment import camera_artefacts, colour_jitter, colour_response, flips_and_rotation, sensor_defects

    x = torch.rand(16, 3, 32, 32) * 255
    g = torch.Generator().manual_seed(4)
    lab = camera_artefacts(colour_response(colour_jitter(flips_and_rotation(x.clone(), g), g), g), g)
    g_lab = torch.Generator().manual_seed(4)
    assert torch.equal(augment_batch(x.clone(), "lab", g_lab), lab.clamp(0, 255))
    expected = sensor_defects(lab, g).clamp(0, 255)
    assert torch.equal(augment_batch(x.clone(), "lab_sensor", torch.Generator().manual_seed(4)), expected)
    assert not torch.equal(expected, lab.clamp(0, 255))
    field = torch.full((400, 3, 32, 32), 64.0)
    y = sensor_defects(field, torch.Generator().manual_seed(0))
    changed = (y != field).flatten(1).any(1).float().mean()
    assert 0.15 < float(changed) < 0.45  # shot noise on a fifth, plus those whose impulse draw sticks a pixel
    median = y.flatten(1).median(1).values
    assert float((median - 64.0).abs().max()) < 3  # the field's level stays where it was
    assert torch.equal(sensor_defects(field, torch.Generator().manual_seed(0), p=0.0), field)


def test_lab_dust_levels_is_lab_sensor_then_dust_and_levels():
    """The policy adds dust and automatic levels to `lab_sensor` with its draws unchanged; each hits about a fifth of
    the images: dust darkens a few small discs of a field, the levels stretch a pale field to black and white."""
    from leukray.augment import (camera_artefacts, colour_jitter, colour_response, dust_and_levels,
                                 flips_and_rotation, sensor_defects)

    x = torch.rand(16, 3, 32, 32) * 255
    g = torch.Generator().manual_seed(4)
    lab = camera_artefacts(colour_response(colour_jitter(flips_and_rotation(x.clone(), g), g), g), g)
    sensor = sensor_defects(lab, g)
    assert torch.equal(augment_batch(x.clone(), "lab_sensor", torch.Generator().manual_seed(4)), sensor.clamp(0, 255))
    expected = dust_and_levels(sensor, g).clamp(0, 255)
    assert torch.equal(augment_batch(x.clone(), "lab_dust_levels", torch.Generator().manual_seed(4)), expected)
    assert not torch.equal(expected, sensor.clamp(0, 255))

    pale = torch.rand(400, 3, 64, 64) * 80 + 150  # values 150-230: a washed-out field with texture
    y = dust_and_levels(pale, torch.Generator().manual_seed(0))
    levelled = (y.flatten(1).amax(1) > 250) & (y.flatten(1).amin(1) < 5)
    assert 0.12 < float(levelled.float().mean()) < 0.3
    darkened = ((y < pale - 1).flatten(1).float().mean(1) > 0) & ~levelled
    assert 0.1 < float(darkened.float().mean()) < 0.3
    specks = (y < pale - 1).flatten(1).float().mean(1)[darkened]
    assert float(specks.max()) < 0.2  # at most 16 discs of radius 0.6-1.7 px at 64 px: a small part of the field
    assert torch.equal(dust_and_levels(pale, torch.Generator().manual_seed(0), p=0.0), pale)


@pytest.mark.parametrize("policy", ["robust", "lab", "lab_defects", "lab_sensor", "lab_dust_levels"])
def test_camera_false_is_the_colour_part_alone(policy):
    """camera=False draws the policy's colours (per image, the same for every pixel of a flat field) and nothing of
    its blur, noise, JPEG or sensor: a flat field stays flat, where the whole policy leaves texture on it."""
    field = torch.zeros(32, 3, 16, 16)
    field[:, 0], field[:, 1], field[:, 2] = 200.0, 80.0, 160.0
    colour = augment_batch(field.clone(), policy, torch.Generator().manual_seed(1), geometry=False, camera=False)
    assert float((colour - field).abs().mean()) > 5  # the colours moved
    spread = colour.flatten(2).std(2)  # per image and channel, over the pixels
    assert float(spread.max()) < 1.0
    whole = augment_batch(field.clone(), policy, torch.Generator().manual_seed(1), geometry=False)
    assert float(whole.flatten(2).std(2).max()) > 5


def test_optics_defects_each_hit_a_fifth_of_the_images():
    from leukray.augment import optics_defects

    field = torch.full((400, 3, 32, 32), 64.0)
    y = optics_defects(field, torch.Generator().manual_seed(0))
    changed = (y != field).flatten(1).any(1).float().mean()
    # a flat field: blur, pixelation and shifted planes leave it, shot noise, glare and gain change every image they
    # hit (1 - 0.8**3 = 0.49), impulse noise those whose drawn fraction sticks a pixel
    assert 0.49 < float(changed) < 0.7
    assert torch.equal(optics_defects(field, torch.Generator().manual_seed(0), p=0.0), field)
    stuck = ((y == 0) | (y == 255)).all(1).flatten(1).float().mean(1)  # dead and hot pixels: black or white
    hit = stuck[stuck > 0]
    assert 0.1 < len(hit) / len(stuck) < 0.3
    assert 0.003 < float(hit.mean()) < 0.008 and float(hit.max()) < 0.03  # a fraction drawn from [0, 1 %]


def test_shot_noise_grows_with_the_signal():
    """Photon noise: its spread grows with the light (a dark field keeps a smaller one than a bright one)."""
    from leukray.augment import optics_defects

    def spread(level: float) -> float:
        field = torch.full((400, 3, 16, 16), level)
        y = optics_defects(field, torch.Generator().manual_seed(1))
        # per image the median absolute deviation (a few stuck pixels do not move it); flat or uniformly moved
        # images (glare, gain) have none, the noisy fifth the most
        flat = y.flatten(1)
        mad = (flat - flat.median(1, keepdim=True).values).abs().median(1).values
        return float(mad.quantile(0.9))

    assert spread(200.0) > 1.8 * spread(30.0)


def test_shifted_plane_moves_by_sub_pixels():
    from leukray.augment import shift_plane

    plane = torch.zeros(1, 4, 8)
    plane[..., 4:] = 100.0
    np.testing.assert_allclose(shift_plane(plane, 1.0, 0.0)[0, 0].numpy(), [0, 0, 0, 0, 0, 100, 100, 100], atol=1e-4)
    np.testing.assert_allclose(shift_plane(plane, -0.5, 0.0)[0, 0].numpy(), [0, 0, 0, 50, 100, 100, 100, 100],
                               atol=1e-4)


def test_each_batch_is_re_encoded_with_one_of_its_codecs():
    """codecs=("jpeg", "webp"): the draws before the codec are the same as with one codec, so each batch comes out
    exactly as the JPEG-only or the WebP-only policy makes it from the same seed, and both turn up."""
    from leukray.augment import camera_artefacts

    x = torch.rand(8, 3, 32, 32) * 255
    picked = []
    for seed in range(16):
        def run(codecs):
            return camera_artefacts(x.clone(), torch.Generator().manual_seed(seed), codecs=codecs)

        both, jpeg, webp = run(("jpeg", "webp")), run(("jpeg",)), run(("webp",))
        assert not torch.equal(jpeg, webp)
        assert torch.equal(both, jpeg) or torch.equal(both, webp)
        picked.append(torch.equal(both, webp))
    assert 3 <= sum(picked) <= 13


@pytest.mark.parametrize("codecs, match", [(("png",), "'png' is not a codec; allowed: jpeg, webp"),
                                           (("webp", "webp"), "names 'webp' twice"),
                                           ((), "empty; name at least one of jpeg, webp")])
def test_bad_codecs_are_named(codecs, match):
    with pytest.raises(ValueError, match=match):
        augment_batch(torch.zeros(1, 3, 8, 8), "robust", codecs=codecs)

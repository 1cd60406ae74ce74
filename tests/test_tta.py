"""Test-time augmentation: the views are the dihedral group, the mean is taken over them, modes are checked."""

import numpy as np
import pytest

from leukray.tta import TTA_VIEWS, package_tta, resolve_tta, torch_views, tta_logits, views, with_tta


def _image(h: int = 3, w: int = 3) -> np.ndarray:
    return np.arange(h * w * 2, dtype=np.uint8).reshape(1, h, w, 2)


def test_dihedral8_is_the_eight_rotations_and_mirrors():
    x = _image()
    got = [v[0].tobytes() for v in views(x, "dihedral8")]
    expected = {np.rot90(m, k, (0, 1)).tobytes() for m in (x[0], x[0][:, ::-1]) for k in range(4)}
    assert len(got) == 8 and set(got) == expected  # all eight, none twice
    assert got[0] == x[0].tobytes()  # identity first


def test_flips4_is_identity_mirrors_and_half_turn():
    x = _image(2, 3)  # non-square is fine without the transposed views
    got = [v[0] for v in views(x, "flips4")]
    for g, e in zip(got, (x[0], x[0][:, ::-1], x[0][::-1], np.rot90(x[0], 2, (0, 1)))):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("mode", list(TTA_VIEWS))
def test_torch_views_are_the_numpy_views_in_the_same_order(mode):
    import torch

    x = np.random.default_rng(1).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    got = [v.permute(0, 2, 3, 1).numpy() for v in torch_views(torch.from_numpy(x).permute(0, 3, 1, 2), mode)]
    expected = list(views(x, mode))
    assert len(got) == len(expected) == TTA_VIEWS[mode]
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


def test_mean_over_views_by_hand():
    """A 'model' that reads the top-left pixel: the flips and the dihedral group both visit each corner equally."""
    x = np.zeros((2, 4, 4, 1), dtype=np.uint8)
    x[0, 0, 0], x[0, 0, -1], x[0, -1, 0], x[0, -1, -1] = 8, 16, 32, 64
    x[1, 0, 0] = 100
    top_left = lambda b: b[:, 0, 0, :].astype(np.float32)  # noqa: E731
    np.testing.assert_allclose(tta_logits(top_left, x, "none"), [[8], [100]])
    np.testing.assert_allclose(tta_logits(top_left, x, "flips4"), [[30], [25]])
    np.testing.assert_allclose(tta_logits(top_left, x, "dihedral8"), [[30], [25]])
    assert with_tta(top_left, "none") is top_left


def test_invariant_model_is_unchanged_and_calls_are_counted():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    calls = []

    def mean_colour(b):
        calls.append(len(b))
        assert b.flags["C_CONTIGUOUS"]
        return b.mean(axis=(1, 2))

    for mode, n in TTA_VIEWS.items():
        calls.clear()
        np.testing.assert_allclose(tta_logits(mean_colour, x, mode), x.mean(axis=(1, 2)), rtol=1e-6)
        assert calls == [5] * n


def test_modes_are_checked_and_packages_without_one_are_single_view():
    with pytest.raises(ValueError, match=r"tta='d8'.*none, flips4, dihedral8"):
        tta_logits(lambda b: b, _image(), "d8")
    with pytest.raises(ValueError, match="allowed: package, none"):
        resolve_tta("all", {})
    with pytest.raises(ValueError, match="square"):
        list(views(_image(2, 3), "dihedral8"))
    assert package_tta({}) == "none" and package_tta({"tta": None}) == "none"
    assert resolve_tta("package", {"tta": "dihedral8"}) == "dihedral8"
    assert resolve_tta("none", {"tta": "dihedral8"}) == "none"


def test_configs_reject_unknown_modes():
    from leukray.config import ConfigError, load_config
    from leukray.score import ScoreConfig
    from leukray.train import TrainConfig

    with pytest.raises((ConfigError, ValueError), match="dihedral"):
        load_config(TrainConfig, None, {"tta": "dihedral"})
    with pytest.raises((ConfigError, ValueError), match="tta"):
        load_config(ScoreConfig, None, {"tta": "dihedral"})
    assert load_config(TrainConfig, None, {"tta": "flips4"}).tta == "flips4"

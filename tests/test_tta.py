"""Test-time augmentation: the views are the dihedral group, the mean is taken over them, modes are checked."""

import numpy as np
import pytest

from leukray.inference import tta_logits, with_tta
from leukray.tta import TTA_VIEWS, package_tta, resolve_tta, torch_views, views


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
        assert calls == [5 * n]  # a small batch: every view in one call
    big = np.concatenate([x] * 40)  # 200 images x 4 views > 512: one call per view
    calls.clear()
    np.testing.assert_allclose(tta_logits(mean_colour, big, "flips4"), big.mean(axis=(1, 2)), rtol=1e-6)
    assert calls == [200] * 4


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


class _RecordingBackend:
    """A stand-in network: logits = the image's mean colour per channel (2 channels → 2 'classes'), features none;
    records which views each call asked for."""

    def __init__(self):
        self.calls = []

    def mean_views(self, images, ids):
        from leukray.tta import view

        self.calls.append((len(images), list(ids)))
        return np.mean([view(images, i).astype(np.float64)[:, 0, 0, :] for i in ids], axis=0).astype(np.float32)


def test_adaptive_scores_every_image_once_and_only_the_unsure_in_all_eight_views():
    from leukray.inference import Predictor, ViewPolicy, softmax

    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, (6, 3, 3, 2)).astype(np.uint8)
    x[:3, 0, 0, 0] = 200  # images 0-2: the identity view's corner makes class 0 certain
    backend = _RecordingBackend()
    policy = ViewPolicy("adaptive", temperature=2.0, temperature_one_view=3.0, threshold=0.99)
    out = Predictor(backend, policy, 2)(x)
    one = x[:, 0, 0, :].astype(np.float64)
    unsure = softmax(one, 3.0).max(1) < 0.99
    assert unsure.tolist() == [False] * 3 + [True] * 3
    assert backend.calls == [(6, [0]), (3, [1, 2, 3, 4, 5, 6, 7])]
    assert out.views.tolist() == [1, 1, 1, 8, 8, 8] and out.temperature.tolist() == [3.0] * 3 + [2.0] * 3
    full = np.mean([backend.mean_views(x, [i]) for i in range(8)], axis=0)
    np.testing.assert_allclose(out.values[unsure], full[unsure], rtol=1e-6)
    np.testing.assert_allclose(out.values[~unsure], one[~unsure], rtol=1e-6)


def test_view_policy_takes_each_mode_s_temperature_from_the_card():
    from leukray.inference import ViewPolicy

    card = {"name": "m", "version": "v1", "tta": "adaptive", "temperature": 1.2,
            "adaptive": {"full": "dihedral8", "threshold": 0.97, "temperature_one_view": 1.5, "temperature_full": 1.2}}
    assert ViewPolicy.from_card(card) == ViewPolicy("adaptive", 1.2, 1.5, 0.97)
    assert ViewPolicy.from_card(card, "none") == ViewPolicy("none", 1.5)
    assert ViewPolicy.from_card(card, "dihedral8") == ViewPolicy("dihedral8", 1.2)
    assert not ViewPolicy.from_card(card, "flips4").calibrated
    with pytest.raises(ValueError, match="calibrate --tta adaptive"):
        ViewPolicy.from_card({"tta": "dihedral8", "temperature": 1.0}, "adaptive")

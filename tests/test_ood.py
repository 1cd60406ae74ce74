"""The out-of-distribution guard (leukray/ood.py): scores against brute force, thresholds at the validation quantile,
the package round trip, and `leukray evaluate --ood` / `leukray calibrate` on a package trained the way users train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leukray.ood import (METHODS, OODConfig, auroc, energy_scores, fit_guard, knn_scores, load_guard, msp_scores,
                         review_reason, save_reference, split_outputs)

REPO = Path(__file__).resolve().parent.parent


def _cloud(rng: np.random.Generator, n: int, centre: np.ndarray, spread: float = 0.05) -> np.ndarray:
    return centre + rng.normal(0, spread, (n, len(centre)))


def test_knn_score_is_the_distance_to_the_kth_neighbour():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 8))
    ref_n = (ref / np.linalg.norm(ref, axis=1, keepdims=True)).astype(np.float16)
    q = rng.normal(size=(7, 8)) * 3  # not normalised: the score normalises
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    brute = np.sort(np.linalg.norm(qn[:, None] - ref_n.astype(np.float64)[None], axis=2), axis=1)
    for k in (1, 5, 50):
        np.testing.assert_allclose(knn_scores(q, ref_n, k), brute[:, k - 1], atol=1e-3)  # float16 reference
    np.testing.assert_allclose(knn_scores(q, ref_n, 500), brute[:, -1], atol=1e-3)  # k beyond the reference: farthest


def test_energy_and_msp_by_hand():
    logits = np.array([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(energy_scores(logits, 1.0), -np.log(np.exp(logits).sum(1)))
    np.testing.assert_allclose(msp_scores(logits, 1.0), [1 - np.e ** 2 / (np.e ** 2 + 3), 0.75])
    np.testing.assert_allclose(msp_scores(logits, 2.0)[0], 1 - np.e / (np.e + 3))


def test_fit_sets_each_threshold_at_the_validation_quantile_and_flags_far_points():
    rng = np.random.default_rng(1)
    centre = rng.normal(size=32)
    train, val = _cloud(rng, 300, centre), _cloud(rng, 200, centre)
    far = _cloud(rng, 50, -centre)  # another cloud entirely
    val_logits = rng.normal(size=(200, 4)) * 3
    guard = fit_guard(train, val_logits, val, 1.0, OODConfig(k=10, in_fraction=0.9))
    for m in METHODS:
        s = guard.scores(val_logits, val, m)
        assert guard.in_distribution(s, m).mean() == pytest.approx(0.9, abs=0.01)
    assert guard.fitted["val_flagged_fraction"] == pytest.approx(0.1, abs=0.01)
    assert not guard.in_distribution(guard.scores(np.zeros((50, 4)), far)).any()
    assert auroc(guard.scores(val_logits, val), guard.scores(np.zeros((50, 4)), far)) == 1.0
    assert guard.reference.dtype == np.float16 and guard.reference.shape == (300, 32)
    np.testing.assert_allclose(np.linalg.norm(guard.reference.astype(np.float64), axis=1), 1.0, atol=1e-3)


def test_card_and_reference_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    centre = rng.normal(size=16)
    guard = fit_guard(_cloud(rng, 40, centre), rng.normal(size=(20, 4)), _cloud(rng, 20, centre), 1.3,
                      fitted={"split": "val"})
    save_reference(guard, str(tmp_path))
    card = {"ood": json.loads(json.dumps(guard.card()))}
    back = load_guard(str(tmp_path), card)
    assert back.method == "knn" and back.k == 10 and back.thresholds == guard.thresholds
    np.testing.assert_array_equal(back.reference, guard.reference)
    assert back.fitted["split"] == "val"
    assert load_guard(str(tmp_path), {}) is None  # a package from before the guard


def test_config_names_bad_values():
    with pytest.raises(ValueError, match="'mahalanobis' is not one of: knn, energy, msp"):
        OODConfig(method="mahalanobis")
    with pytest.raises(ValueError, match="in_fraction"):
        OODConfig(in_fraction=1.0)
    with pytest.raises(ValueError, match="ood.k"):
        OODConfig(k=0)


def test_split_outputs_and_review_reason():
    out = np.arange(12, dtype=np.float32).reshape(2, 6)
    logits, feats = split_outputs(out, 4)
    assert logits.shape == (2, 4) and feats.shape == (2, 2)
    assert split_outputs(out[:, :4], 4)[1] is None
    assert review_reason(np.array([True, False, True, False]), np.array([False, True, True, False])) == [
        "low_confidence", "out_of_distribution", "low_confidence,out_of_distribution", None]
    assert review_reason(np.array([True, False]), None) == ["low_confidence", None]


@pytest.fixture(scope="module")
def imagenet_package(synth_data, tmp_path_factory):
    """ImageNet backbone, one epoch on generated smears at 64 px: features that know a smear from a blank field."""
    from leukray.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ood-pkg") / "package"
    train(TrainConfig.model_validate({
        "data": {"root": str(synth_data)}, "image_size": 64, "model": {"weights": "imagenet"}, "epochs": 1,
        "batch_size": 16, "augment": "study", "seed": 0, "num_threads": 1, "tta": "flips4"}), str(out))
    return out


def test_evaluate_ood_flags_far_off_folders(imagenet_package, synth_data, tmp_path):
    """Generated folders of blank fields and photographs against the package's test split: the guard flags them
    all at its shipped threshold (AUROC 1), and the report has both methods side by side and the histogram."""
    from leukray.synth import make_ood_folders

    ood = make_ood_folders(tmp_path / "ood", per_folder=10, size=64, seed=1)
    r = subprocess.run([sys.executable, "-m", "leukray.cli", "evaluate", "--model", str(imagenet_package), "--data",
                        str(synth_data), "--out", str(tmp_path / "ev"), "--ood", str(ood / "blank"),
                        str(ood / "natural")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    rows = {Path(x["folder"]).name: x for x in report["ood_folders"]["folders"]}
    for name in ("blank", "natural"):
        assert rows[name]["n"] == 10
        assert rows[name]["knn_auroc"] == 1.0 and rows[name]["knn_flagged_fraction"] == 1.0, rows[name]
        assert 0.0 <= rows[name]["msp_auroc"] <= 1.0 and "msp_flagged_fraction" in rows[name]
        assert rows[name]["needs_review_fraction"] == 1.0
    assert (tmp_path / "ev" / "ood_scores.png").stat().st_size > 10_000
    assert "knn_auroc" in (tmp_path / "ev" / "ood.csv").read_text().splitlines()[0]
    assert report["ood"]["method"] == "knn" and 0.0 <= report["ood"]["flagged_fraction"] <= 1.0
    predictions = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()
    assert predictions[0].split(",")[4:7] == ["needs_review", "review_reason", "ood_score"]


def test_calibrate_adds_the_guard_to_a_package_from_before_it(imagenet_package, synth_data, tmp_path):
    """A package without a guard and with a logits-only ONNX graph (as exported before): calibrate re-exports the
    graph with its features output and fits the guard on the training rows: the same guard training fitted."""
    import shutil
    import warnings

    import onnx
    import torch

    from leukray.evaluate import evaluate
    from leukray.recalibrate import calibrate
    from leukray.registry import load_package

    old = tmp_path / "old"
    shutil.copytree(imagenet_package, old)
    card = json.loads((old / "model_card.json").read_text())
    trained_guard = card.pop("ood")
    (old / "model_card.json").write_text(json.dumps(card))
    (old / "ood_reference.npy").unlink()
    pkg = load_package(str(old))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(pkg.model.eval(), (torch.zeros(1, 3, 64, 64),), str(old / "model.onnx"),
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    before = evaluate(str(old), str(synth_data), str(tmp_path / "ev-old"), plots=False)
    assert before["ood"] is None

    summary = calibrate(str(old), str(synth_data), str(tmp_path / "new"))
    assert summary["onnx_reexported"] is True and summary["ood"]["threshold_before"] is None
    new_card = json.loads((tmp_path / "new" / "model_card.json").read_text())
    assert len(onnx.load(str(tmp_path / "new" / "model.onnx")).graph.output) == 2
    assert new_card["ood"]["method"] == "knn"
    for m in METHODS:  # same images, same network, same views: the guard training fitted
        assert new_card["ood"]["thresholds"][m] == pytest.approx(trained_guard["thresholds"][m], rel=1e-3, abs=1e-4)
    after = evaluate(str(tmp_path / "new"), str(synth_data), str(tmp_path / "ev-new"), plots=False)
    assert after["ood"]["method"] == "knn" and after["accuracy"] == before["accuracy"]

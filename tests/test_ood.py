"""The out-of-distribution guard (leukray/ood.py): scores against brute force, thresholds at the validation quantile,
the package round trip, and `leukray evaluate --ood` / `leukray calibrate` on a package trained the way users train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leukray.ood import (METHODS, OODConfig, auroc, check_names, energy_scores, fit_guard, knn_scores, load_guard,
                         msp_scores, low_confidence, review_reason, save_reference, score_medians, split_outputs)

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


def test_validation_medians_per_class_tell_a_shift_the_flags_miss(tmp_path):
    """`score_median`: the validation images' median score per predicted class (a class with fewer than
    `SHIFT_MIN_PER_CLASS` takes the overall one), recorded on the card; about half of in-distribution images lie
    above their class's, most images moved a little away from the training images do, while the guard flags few
    of them. A guard widened on a lab's images without their logits drops the medians (they would no longer say
    what is typical there; with the logits they are refitted: the widening test)."""
    from leukray.ood import SHIFT_MIN_PER_CLASS, above_median, widen_guard

    rng = np.random.default_rng(7)
    centre = 10 * rng.normal(size=32) / np.sqrt(32)
    spreads = (0.08, 0.04, 0.04, 0.04)  # class 0's images lie farther apart, so farther from their neighbours

    def images(n_per_class, offset=0.0):
        x = np.concatenate([_cloud(rng, n, centre + 0.5 * c + offset, spreads[c]) for c, n in enumerate(n_per_class)])
        logits = np.repeat(np.eye(4) * 5, n_per_class, axis=0)
        return x, logits

    train, _ = images((300, 300, 300, 300))
    val, val_logits = images((60, 60, 60, SHIFT_MIN_PER_CLASS - 1))
    guard = fit_guard(train, val_logits, val, 1.0, OODConfig(k=10, in_fraction=0.97))
    med = guard.fitted["score_median"]
    assert med["by_class"][3] is None and med["n_val"] == len(val)  # too few class-3 validation images
    assert med["by_class"][0] > 1.5 * med["by_class"][1]
    val_scores = guard.scores(val_logits, val)
    assert med["all"] == pytest.approx(float(np.median(val_scores)))
    for c in range(3):
        assert med["by_class"][c] == pytest.approx(float(np.median(val_scores[val_logits.argmax(1) == c])))
    new, new_logits = images((200, 200, 200, 200))  # more images like the validation ones
    above = guard.above_median(guard.scores(new_logits, new), new_logits.argmax(1))
    for c in range(3):
        assert above[new_logits.argmax(1) == c].mean() == pytest.approx(0.5, abs=0.1)
    # a day of mostly class-0 images: compared with the overall median nearly all would count as moved
    day, day_logits = images((200, 10, 10, 10))
    day_scores = guard.scores(day_logits, day)
    assert (day_scores > med["all"]).mean() > 0.8
    assert guard.above_median(day_scores, day_logits.argmax(1)).mean() == pytest.approx(0.5, abs=0.1)
    # every image moved a little: few flagged, most above their class's median
    direction = rng.normal(size=32)
    moved, moved_logits = images((200, 200, 200, 200), offset=0.25 * direction / np.linalg.norm(direction))
    moved_scores = guard.scores(moved_logits, moved)
    assert (~guard.in_distribution(moved_scores)).mean() < 0.15
    assert guard.above_median(moved_scores, moved_logits.argmax(1)).mean() > 0.8
    np.testing.assert_array_equal(above_median(med, moved_scores, moved_logits.argmax(1)),
                                  guard.above_median(moved_scores, moved_logits.argmax(1)))
    save_reference(guard, str(tmp_path))  # through the card
    back = load_guard(str(tmp_path), {"ood": json.loads(json.dumps(guard.card()))})
    assert back.fitted["score_median"] == med
    wide = widen_guard(back, moved[:100], 1.0, {"lab_samples": [{"n": 100}]})  # no logits: no medians
    assert "score_median" not in wide.card() and wide.above_median(moved_scores, moved_logits.argmax(1)) is None


def test_optics_check_flags_what_lies_nearer_the_wrong_optics_and_keeps_in_fraction(tmp_path):
    """The optics check: validation images pass at `in_fraction` as before (knn's own threshold moves out to
    `far_fraction`); an image between the training cloud and the cloud of its wrong-optics copies, nearer the latter
    but within knn's new threshold, is flagged by `optics` alone; one nearer the training images passes; the check
    survives the package round trip and a lab's images widening the references."""
    from leukray.ood import widen_guard

    rng = np.random.default_rng(3)
    centre, off = rng.normal(size=32), rng.normal(size=32)
    centre, off = 10 * centre / np.linalg.norm(centre), 10 * off / np.linalg.norm(off)
    blurred = centre + 0.2 * off  # where the training images land under the wrong optics
    train, val, optics = _cloud(rng, 400, centre, 0.4), _cloud(rng, 300, centre, 0.4), _cloud(rng, 400, blurred, 0.4)
    val_logits = rng.normal(size=(300, 4))
    plain = fit_guard(train, val_logits, val, 1.0, OODConfig(k=5, in_fraction=0.97), pooled_dim=32)
    guard = fit_guard(train, val_logits, val, 1.0, OODConfig(k=5, in_fraction=0.97, far_fraction=0.995),
                      pooled_dim=32, optics_features=optics)
    # default: knn's threshold as without the check, which passes every validation image and only adds flags
    added = fit_guard(train, val_logits, val, 1.0, OODConfig(k=5, in_fraction=0.97), pooled_dim=32,
                      optics_features=optics)
    assert added.thresholds == plain.thresholds and added.fitted["optics"]["far_fraction"] == 0.97
    assert added.fitted["val_flagged_fraction"] == plain.fitted["val_flagged_fraction"]
    # validation images that duplicate training images (knn distance 0): a finite threshold, finite scores
    dup = fit_guard(train, val_logits[:50], train[:50], 1.0, OODConfig(k=5), pooled_dim=32, optics_features=optics)
    assert 0 < dup.optics_threshold < np.inf and np.isfinite(dup.scores(val_logits[:50], train[:50])).all()
    assert guard.threshold > plain.threshold  # knn's own threshold at far_fraction
    assert guard.fitted["val_flagged_fraction"] <= plain.fitted["val_flagged_fraction"] + 0.01  # at most as many
    toward = centre + 0.14 * off  # nearer the wrong-optics cloud, not far enough for knn's new threshold
    queries = {"toward": _cloud(rng, 20, toward, 0.4), "home": _cloud(rng, 20, centre + 0.02 * off, 0.4)}
    logits = np.zeros((20, 4))
    _, by = guard.flagged_by(logits, queries["toward"])
    assert list(by) == ["knn", "optics"] and by["optics"].mean() >= 0.3 and by["knn"].mean() <= 0.1
    passed_plain = plain.in_distribution(plain.scores(logits, queries["toward"])).mean()
    assert passed_plain >= 0.5  # knn alone: most pass
    assert guard.in_distribution(guard.scores(logits, queries["toward"])).mean() < passed_plain  # with a looser knn
    assert guard.in_distribution(guard.scores(logits, queries["home"])).mean() >= 0.9
    # the check looks only past the gate (the validation images' 90 % quantile of knn distance): nearer, never flagged
    knn_val = guard.check_scores(val_logits, val)["knn"]
    assert guard.optics_gate == pytest.approx(np.quantile(knn_val, 0.9), rel=1e-6)
    assert not guard.flagged_by(val_logits, val)[1]["optics"][knn_val <= guard.optics_gate].any()
    save_reference(guard, str(tmp_path))
    card = json.loads(json.dumps(guard.card()))
    assert card["optics"]["reference"]["n"] == 400 and card["optics"]["far_fraction"] == 0.995
    assert card["optics"]["gate"] == guard.optics_gate
    back = load_guard(str(tmp_path), {"ood": card})
    np.testing.assert_array_equal(back.scores(logits, queries["toward"]), guard.scores(logits, queries["toward"]))
    wide = widen_guard(back, _cloud(rng, 50, -centre, 0.4), 1.0, {})
    assert wide.optics_threshold == guard.optics_threshold and len(wide.optics_reference) == 400
    with pytest.raises(ValueError, match=r"ood.far_fraction=0.9 must be in \[ood.in_fraction=0.97, 1\]"):
        OODConfig(far_fraction=0.9)


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
    with pytest.raises(ValueError, match=r"ood.reference_colour_copies=9 must be in \[0, 8\]"):
        OODConfig(reference_colour_copies=9)


def test_split_outputs_and_review_reason():
    out = np.arange(12, dtype=np.float32).reshape(2, 6)
    logits, feats = split_outputs(out, 4)
    assert logits.shape == (2, 4) and feats.shape == (2, 2)
    assert split_outputs(out[:, :4], 4)[1] is None
    assert review_reason(np.array([True, False, True, False]), np.array([False, True, True, False])) == [
        "low_confidence", "out_of_distribution", "low_confidence,out_of_distribution", None]
    assert review_reason(np.array([True, False]), None) == ["low_confidence", None]


def test_low_confidence_also_holds_the_benign_malignant_call_to_its_own_threshold():
    """A class that clears the review threshold still goes to review when the other side of benign vs malignant
    holds more than 10 %; doubt between malignant subtypes does not."""
    probs = np.array([[0.85, 0.15, 0.00, 0.00],   # Benign at 0.85, malignant 0.15: the call is in doubt
                      [0.05, 0.85, 0.10, 0.00],   # Early Pre-B at 0.85, but malignant at 0.95: the call is sure
                      [0.12, 0.88, 0.00, 0.00],   # malignant at 0.88
                      [0.50, 0.30, 0.20, 0.00],   # below the plain threshold
                      [0.97, 0.01, 0.01, 0.01]])
    classes = ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]
    assert low_confidence(probs, classes, 0.8, 0.9).tolist() == [True, False, True, True, False]
    assert low_confidence(probs, classes, 0.8, 0.0).tolist() == [False, False, False, True, False]
    no_benign = ["Other", "Early Pre-B", "Pre-B", "Pro-B"]
    assert low_confidence(probs, no_benign, 0.8, 0.9).tolist() == [False, False, False, True, False]
    from leukray.score_config import ScoreConfig

    with pytest.raises(ValueError, match=r"benign_malignant_threshold=1.5 must be in \[0, 1\]"):
        ScoreConfig(benign_malignant_threshold=1.5)


@pytest.fixture(scope="module")
def imagenet_package(synth_data, tmp_path_factory):
    """ImageNet backbone, one epoch on generated smears at 64 px: features that know a smear from a blank field."""
    from leukray.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ood-pkg") / "package"
    train(TrainConfig.model_validate({
        "data": {"root": str(synth_data)}, "image_size": 64, "model": {"weights": "imagenet"}, "epochs": 1,
        "batch_size": 16, "augment": "study", "seed": 0, "num_threads": 1, "tta": "flips4"}), str(out))
    return out


def test_synth_ood_defocus_is_a_cameras_defocus():
    """`defocus` fields keep the smear's cells but lose their edges, and carry a sensor's noise and JPEG blocks as a
    camera would record them (a noise-free blur is easier to tell from a sharp field than a real defocus is)."""
    from scipy.ndimage import gaussian_filter

    from leukray.synth import defocus_field, smear_image

    rng = np.random.default_rng(3)
    smear = np.asarray(smear_image("Pro-B", rng, 224)).astype(np.float64)
    out = np.asarray(defocus_field(smear.astype(np.uint8), rng, 224)).astype(np.float64)
    assert out.shape == smear.shape
    grey, grey_out = smear.mean(2), out.mean(2)

    def band(a: np.ndarray, lo: float, hi: float) -> float:  # energy between two scales
        return float(np.std(gaussian_filter(a, lo) - gaussian_filter(a, hi)))

    assert np.corrcoef(gaussian_filter(grey, 8).ravel(), gaussian_filter(grey_out, 8).ravel())[0, 1] > 0.9  # cells
    assert band(grey_out, 1.5, 3) < 0.5 * band(grey, 1.5, 3)  # edges gone
    assert np.std(grey_out - gaussian_filter(grey_out, 1)) > 1.0  # pixel noise (a noise-free blur: ~0)


def test_evaluate_ood_flags_far_off_folders(imagenet_package, synth_data, tmp_path):
    """Generated folders of blank fields and photographs against the package's test split: the guard flags them
    all at its shipped threshold (AUROC 1), and the report has both methods side by side and the histogram."""
    from PIL import Image

    from leukray.synth import OOD_FOLDERS, make_ood_folders

    ood = make_ood_folders(tmp_path / "ood", per_folder=10, size=64, seed=1)
    for name in OOD_FOLDERS:
        files = sorted((ood / name).glob("*.png"))
        assert len(files) == 10 and Image.open(files[0]).size == (64, 64), name
    r = subprocess.run([sys.executable, "-m", "leukray.cli", "evaluate", "--model", str(imagenet_package), "--data",
                        str(synth_data), "--out", str(tmp_path / "ev"), "--ood", str(ood / "blank"),
                        str(ood / "natural"), str(ood / "tissue"), str(ood / "wide_field")], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    rows = {Path(x["folder"]).name: x for x in report["ood_folders"]["folders"]}
    for name in ("blank", "natural", "tissue"):
        assert rows[name]["n"] == 10
        assert rows[name]["knn_auroc"] == 1.0 and rows[name]["knn_flagged_fraction"] == 1.0, rows[name]
        assert 0.0 <= rows[name]["msp_auroc"] <= 1.0 and "msp_flagged_fraction" in rows[name]
        assert rows[name]["needs_review_fraction"] == 1.0
    # smears at a third to a half of their magnification: reported like every folder (measured on a real
    # package in docs/results.md; this one's features are a single epoch on generated smears)
    assert rows["wide_field"]["n"] == 10 and 0.0 <= rows["wide_field"]["knn_auroc"] <= 1.0
    assert (tmp_path / "ev" / "ood_scores.png").stat().st_size > 10_000
    header = (tmp_path / "ev" / "ood.csv").read_text().splitlines()[0].split(",")
    assert {"knn_auroc", "ood_by_knn", "ood_by_optics", "ood_by_colour", "ood_by_structure"} <= set(header)
    # which check caught what: each check flags part, together every flagged image; blank fields lack structure
    for name in ("blank", "natural", "tissue"):
        by = rows[name]["ood_by_check"]
        assert set(by) == {"knn", "optics", "colour", "structure"}
        assert max(by.values()) <= rows[name]["knn_flagged_fraction"] <= sum(by.values())  # each, and together all
    assert rows["blank"]["ood_by_check"]["structure"] >= 0.8
    assert set(report["ood_folders"]["in_distribution"]["ood_by_check"]) == {"knn", "optics", "colour", "structure"}
    assert set(report["ood"]["ood_by_check"]) == {"knn", "optics", "colour", "structure"}
    assert report["ood"]["method"] == "knn" and 0.0 <= report["ood"]["flagged_fraction"] <= 1.0
    predictions = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()
    assert predictions[0].split(",")[4:8] == ["needs_review", "review_reason", "ood_score", "ood_check"]
    import csv

    for r in csv.DictReader(predictions):
        assert (r["ood_check"] != "") == ("out_of_distribution" in r["review_reason"]), r


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
    (old / "ood_optics_reference.npy").unlink()
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
    assert len(onnx.load(str(tmp_path / "new" / "model.onnx")).graph.output) == 3
    assert new_card["ood"]["method"] == "knn"
    for m in METHODS:  # same images, same network, same views: the guard training fitted
        assert new_card["ood"]["thresholds"][m] == pytest.approx(trained_guard["thresholds"][m], rel=1e-3, abs=1e-4)
    assert new_card["ood"]["colour"]["threshold"] == pytest.approx(trained_guard["colour"]["threshold"], rel=1e-3)
    assert (tmp_path / "new" / new_card["ood"]["colour"]["reference"]["file"]).exists()
    # the optics check, rebuilt from the training rows as training built it
    assert new_card["ood"]["optics"]["threshold"] == pytest.approx(trained_guard["optics"]["threshold"], rel=1e-3)
    assert new_card["ood"]["optics"]["reference"]["n"] == trained_guard["optics"]["reference"]["n"] > 0
    assert (tmp_path / "new" / "ood_optics_reference.npy").exists()
    # the validation medians the drift report's shift compares with, as training recorded them
    for got, want in zip(new_card["ood"]["score_median"]["by_class"], trained_guard["score_median"]["by_class"]):
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-3)
    after = evaluate(str(tmp_path / "new"), str(synth_data), str(tmp_path / "ev-new"), plots=False)
    assert after["ood"]["method"] == "knn" and after["accuracy"] == before["accuracy"]


def test_calibrate_reexports_a_graph_with_an_older_structure_statistic(imagenet_package, synth_data, tmp_path):
    """A package whose card names another structure statistic (exported before dark frames were scaled down):
    calibrate re-exports its graph, and the thresholds stay where they were (the statistics agree on lit fields)."""
    import shutil

    from leukray.ood import STRUCTURE_STATISTIC
    from leukray.recalibrate import calibrate

    old = tmp_path / "old"
    shutil.copytree(imagenet_package, old)
    card = json.loads((old / "model_card.json").read_text())
    assert card["ood"]["structure"]["statistic"] == STRUCTURE_STATISTIC
    card["ood"]["structure"]["statistic"] = "leukray.colour.structure (band-passed optical density)"
    (old / "model_card.json").write_text(json.dumps(card))
    summary = calibrate(str(old), str(synth_data), str(tmp_path / "new"))
    new_card = json.loads((tmp_path / "new" / "model_card.json").read_text())
    assert summary["onnx_reexported"] is True
    assert new_card["ood"]["structure"]["statistic"] == STRUCTURE_STATISTIC
    assert new_card["ood"]["structure"]["threshold"] == pytest.approx(card["ood"]["structure"]["threshold"], rel=1e-3)
    again = calibrate(str(tmp_path / "new"), str(synth_data), str(tmp_path / "again"))
    assert again["onnx_reexported"] is False


def test_scoring_says_what_a_packages_guard_lacks():
    from leukray.ood import STRUCTURE_STATISTIC, guard_notes

    assert guard_notes({"ood": {"structure": {"statistic": STRUCTURE_STATISTIC}}}, "s3://m/v1") == []
    assert guard_notes({"ood": {"method": "knn"}}, "s3://m/v1") == []  # no structure check: nothing to update
    (none,) = guard_notes({}, "s3://m/v1")
    assert none.startswith("warning: s3://m/v1 has no out-of-distribution guard") and "leukray calibrate" in none
    (old,) = guard_notes({"ood": {"structure": {"statistic": "leukray.colour.structure (older)"}}}, "s3://m/v1")
    assert "structure check is older than this version's" in old and "leukray calibrate" in old


def _smears(n: int = 24, size: int = 64) -> np.ndarray:
    """Generated smear-like images (uint8 NHWC): purple nuclei, pink cells, pale background."""
    from leukray import CLASSES
    from leukray.synth import smear_image

    rng = np.random.default_rng(3)
    return np.stack([np.asarray(smear_image(CLASSES[i % len(CLASSES)], rng, size)) for i in range(n)])


def test_colour_signature_ignores_camera_and_dye_amount_and_sees_foreign_colours():
    """Another camera's white balance, exposure or stain batch moves the signature far less than an RGB/BGR swap, an
    inverted or a grey image — what the colour check tells apart."""
    import torch

    from leukray import colour

    x = torch.from_numpy(_smears()).permute(0, 3, 1, 2).float()
    base = colour.signature(x)
    near = {
        "warm camera": colour.camera_gains(x / 255, torch.tensor([1.2, 1.0, 0.8])) * 255,
        "exposure 0.6": colour.exposure(x / 255, 0.6) * 255,
        "more dye": colour.stain_concentration(x / 255, 1.4, 1.4) * 255,
    }
    far = {"BGR": x[:, [2, 1, 0]], "inverted": 255 - x, "grey": x.mean(1, keepdim=True).expand_as(x)}
    near_d = {k: (colour.signature(v) - base).norm(dim=1).median().item() for k, v in near.items()}
    far_d = {k: (colour.signature(v) - base).norm(dim=1).median().item() for k, v in far.items()}
    assert max(near_d.values()) < 0.5 * min(far_d.values()), (near_d, far_d)


def test_colour_check_flags_foreign_colours_and_keeps_other_labs_colours():
    """Fit on the signature envelope of generated smears: validation images under other cameras pass, the same
    images with red and blue swapped or in grey are flagged, and the row's score stays on the knn threshold's scale."""
    import torch

    from leukray import colour

    images = _smears(48)
    train, val = images[:32], images[32:]
    rng = np.random.default_rng(0)
    feats = lambda n: rng.normal(size=(n, 16)) + 5.0  # noqa: E731  same cloud: knn passes everything
    sig = lambda a: colour.signature(torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float()).numpy()  # noqa: E731
    cfg = OODConfig(k=3, in_fraction=0.97, colour_in_fraction=1.0, colour_copies=3)
    guard = fit_guard(feats(32), rng.normal(size=(16, 4)), np.c_[feats(16), sig(val)], 1.0, cfg,
                      colour_reference=colour.signature_envelope(train, 0, 3),
                      colour_val=colour.signature_envelope(val, 1, 3), pooled_dim=16)
    assert guard.colour_threshold is not None and guard.fitted["colour"]["copies"] == 3
    shifted = (colour.camera_gains(torch.from_numpy(val).permute(0, 3, 1, 2).float() / 255,
                                   torch.tensor([0.85, 1.0, 1.15])) * 255).round().permute(0, 2, 3, 1).numpy()
    logits = np.zeros((16, 4))
    ok = guard.in_distribution(guard.scores(logits, np.c_[feats(16), sig(shifted.astype(np.uint8))]))
    assert ok.mean() >= 0.9
    for foreign in (val[..., ::-1], np.repeat(val.mean(3, keepdims=True), 3, 3).astype(np.uint8)):
        scores = guard.scores(logits, np.c_[feats(16), sig(foreign)])
        flagged = ~guard.in_distribution(scores)
        assert flagged.mean() >= 0.9
        assert (scores[flagged] > guard.thresholds["knn"]).all()  # one score, one threshold
    # without the signature columns (a package exported before the colour check) the knn alone decides
    assert guard.in_distribution(guard.scores(logits, feats(16))).all()


def test_colour_check_round_trips_through_the_package(tmp_path):
    import torch

    from leukray import colour

    images = _smears(16)
    rng = np.random.default_rng(1)
    train = rng.normal(size=(20, 8))
    val = np.c_[rng.normal(size=(10, 8)), colour.signature(torch.from_numpy(images[:10]).permute(0, 3, 1, 2).float()).numpy()]
    guard = fit_guard(train, rng.normal(size=(10, 4)), val, 1.0, OODConfig(k=3), pooled_dim=8,
                      colour_reference=colour.signature_envelope(images, 0, 1),
                      colour_val=colour.signature_envelope(images[:10], 1, 1))
    save_reference(guard, str(tmp_path))
    back = load_guard(str(tmp_path), {"ood": guard.card()})
    assert back.colour_threshold == pytest.approx(guard.colour_threshold)
    np.testing.assert_array_equal(back.colour_reference, guard.colour_reference)
    np.testing.assert_allclose(back.scores(np.zeros((10, 4)), val), guard.scores(np.zeros((10, 4)), val))
    assert back.card()["colour"] == guard.card()["colour"]
    assert back.structure_threshold == pytest.approx(guard.structure_threshold)
    assert back.card()["structure"] == guard.card()["structure"]


def _empty_fields(n: int, size: int = 224) -> np.ndarray:
    """Fields without cells: a uniform lamp colour, bright or dim, with vignetting and sensor noise."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    out = []
    for i in range(n):
        level = (235.0, 130.0)[i % 2] + rng.normal(0, 10, 3)
        vignette = 1 - rng.uniform(0, 0.8) * (xx ** 2 + yy ** 2)
        arr = level * vignette[..., None] + rng.normal(0, rng.uniform(1, 4), (size, size, 3))
        out.append(np.clip(arr, 0, 255).astype(np.uint8))
    return np.stack(out)


def _dark_frames(n: int, size: int = 224) -> np.ndarray:
    """Frames with the lamp off: a background of 10–60 of 255 and the sensor's noise (σ 3–8), which the white-patch
    scaling amplifies."""
    rng = np.random.default_rng(8)
    out = [np.clip(rng.uniform(10, 60) + rng.normal(0, 8, 3) + rng.normal(0, rng.uniform(3, 8), (size, size, 3)),
                   0, 255).astype(np.uint8) for _ in range(n)]
    return np.stack(out)


def _nchw(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float()


def test_structure_tells_empty_fields_from_smears_under_other_labs():
    """A field's structure (band-passed optical density) stays high for smears under another camera, a dimmer lamp
    or a weaker stain batch and is near zero for empty fields, bright or dim, and for dark frames whose amplified
    sensor noise would otherwise read as structure."""
    import torch

    from leukray import colour

    x = _nchw(_smears(12, 224))
    smears = {"as they are": x,
              "warm camera": colour.camera_gains(x / 255, torch.tensor([1.2, 1.0, 0.8])) * 255,
              "exposure 0.6": colour.exposure(x / 255, 0.6) * 255,
              "less dye": colour.stain_concentration(x / 255, 0.6, 0.6) * 255}
    weakest = min(colour.structure(v).min().item() for v in smears.values())
    empty = colour.structure(_nchw(_empty_fields(12)))
    assert empty.max().item() < 0.5 * weakest, (empty.squeeze(1).tolist(), weakest)  # 0.5: ood.structure_margin
    dark = colour.structure(_nchw(_dark_frames(12)))
    assert dark.max().item() < 0.5 * weakest, (dark.squeeze(1).tolist(), weakest)
    od, level = colour.optical_density(smears["exposure 0.6"])
    lit = colour._structure(od, level)  # a dim lamp's smear: not scaled
    np.testing.assert_allclose(lit.numpy(), colour._structure(od, torch.full_like(level, 255.0)).numpy())
    assert colour.image_stats(x).shape == (12, colour.STATS_DIM)
    np.testing.assert_allclose(colour.image_stats(x)[:, colour.SIGNATURE_DIM:].numpy(), colour.structure(x).numpy())


def test_structure_ignores_a_lamps_vignetting():
    """Vignetting is smooth: the structure map's quadratic trend is removed before the band-pass, so an empty field
    that loses three fifths to four fifths of its light at the corners reads as empty (its slope at the field's edge
    read 0.08–0.11 without the removal, above the default's threshold of about 0.06), and a smear keeps its
    structure under the same vignetting."""
    import torch

    from leukray import colour

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 56), torch.linspace(-1, 1, 56), indexing="ij")
    surface = (0.3 + 0.2 * xx - 0.1 * yy + 0.5 * xx ** 2 + 0.4 * xx * yy - 0.3 * yy ** 2)[None, None]
    assert colour._detrend(surface).abs().max().item() < 1e-5
    size = 224
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    rng = np.random.default_rng(3)
    empty = np.stack([240 * (1 - v * (xx ** 2 + yy ** 2))[..., None] + rng.normal(0, 2, (size, size, 3))
                      for v in (0.6, 0.7, 0.8)])
    assert colour.structure(_nchw(np.clip(empty, 0, 255).astype(np.uint8))).max().item() < 0.03
    smears = _nchw(_smears(6, size))
    vignetted = smears * torch.from_numpy(1 - 0.8 * (xx ** 2 + yy ** 2)).float()
    np.testing.assert_allclose(colour.structure(vignetted).numpy(), colour.structure(smears).numpy(), rtol=0.02)


def test_structure_check_flags_empty_fields_on_the_knn_scale():
    """Fitted on the validation smears under other labs' colours: the same smears under another camera pass,
    empty fields that the features put inside the training cloud are flagged with a score above knn's threshold,
    and a graph without the structure value (exported before the check) leaves the decision to knn and colour."""
    from leukray import colour

    images = _smears(24, 224)
    train, val = images[:16], images[16:]
    rng = np.random.default_rng(0)
    train_feats, val_feats = rng.normal(size=(16, 16)) + 5.0, rng.normal(size=(8, 16)) + 5.0
    feats = lambda n: val_feats[:n]  # noqa: E731  the validation features: knn passes them all
    stats = lambda a: colour.image_stats(_nchw(a)).numpy()  # noqa: E731
    cfg = OODConfig(k=3, colour_check=False)
    guard = fit_guard(train_feats, rng.normal(size=(8, 4)), np.c_[feats(8), stats(val)], 1.0, cfg,
                      colour_reference=colour.signature_envelope(train, 0, 3),
                      colour_val=colour.signature_envelope(val, 1, 3), pooled_dim=16)
    assert guard.colour_threshold is None and guard.structure_threshold is not None
    assert guard.fitted["structure"]["margin"] == 0.5
    logits = np.zeros((8, 4))
    warm = (colour.camera_gains(_nchw(val) / 255, np.array([1.15, 1.0, 0.85])) * 255).round().permute(0, 2, 3, 1)
    assert guard.in_distribution(guard.scores(logits, np.c_[feats(8), stats(warm.numpy().astype(np.uint8))])).all()
    scores = guard.scores(logits, np.c_[feats(8), stats(_empty_fields(8))])
    assert not guard.in_distribution(scores).any()
    assert (scores > guard.thresholds["knn"]).all() and (scores <= 10 * guard.thresholds["knn"] + 1e-9).all()
    with_colour_only = np.c_[feats(8), stats(_empty_fields(8))[:, :colour.SIGNATURE_DIM]]
    assert guard.in_distribution(guard.scores(logits, with_colour_only)).all()
    off = fit_guard(train_feats, rng.normal(size=(8, 4)), np.c_[feats(8), stats(val)], 1.0,
                    OODConfig(k=3, colour_check=False, structure_check=False),
                    colour_reference=colour.signature_envelope(train, 0, 3),
                    colour_val=colour.signature_envelope(val, 1, 3), pooled_dim=16)
    assert off.structure_threshold is None and "structure" not in off.card()


def test_each_flag_names_the_check_that_raised_it():
    """`flagged_by` / `check_names` name, per flagged image, every check over the threshold: features far from the
    training cloud → knn, red and blue swapped → colour, no structure → structure, several → all of them; an image
    in distribution → None; and its scores are `scores`'."""
    from leukray import colour

    images = _smears(40, 224)
    train, val = images[:24], images[24:32]
    rng = np.random.default_rng(0)
    centre = rng.normal(size=16) * 3
    train_feats, val_feats = _cloud(rng, 24, centre, 0.3), _cloud(rng, 8, centre, 0.3)
    stats = lambda a: colour.image_stats(_nchw(a)).numpy()  # noqa: E731
    guard = fit_guard(train_feats, rng.normal(size=(8, 4)), np.c_[val_feats, stats(val)], 1.0,
                      OODConfig(k=3, in_fraction=0.97, colour_in_fraction=1.0),
                      colour_reference=colour.signature_envelope(train, 0, 3),
                      colour_val=colour.signature_envelope(val, 1, 3), pooled_dim=16)
    held = images[32:36]
    near, far = _cloud(rng, 4, centre, 0.05), _cloud(rng, 4, -centre, 0.05)
    flat = stats(held)
    flat[:, colour.SIGNATURE_DIM] = 0.0  # a smear's colours, no structure
    cases = {None: np.c_[near, stats(held)], "knn": np.c_[far, stats(held)],
             "colour": np.c_[near, stats(held[..., ::-1])], "structure": np.c_[near, flat],
             "knn,colour": np.c_[far, stats(held[..., ::-1])],
             "colour,structure": np.c_[near, stats(_empty_fields(4))]}  # an empty field: no stain colour either
    logits = np.zeros((4, 4))
    for want, feats in cases.items():
        scores, by = guard.flagged_by(logits, feats)
        np.testing.assert_array_equal(scores, guard.scores(logits, feats))
        assert list(by) == ["knn", "colour", "structure"]
        checks = check_names(by)
        assert [c is not None for c in checks] == (~guard.in_distribution(scores)).tolist()
        assert checks == [want] * 4, (want, checks)
    # another method: its own name; a graph without the check columns: knn alone
    assert check_names(guard.flagged_by(logits, cases["knn"][:, :16])[1]) == ["knn"] * 4
    assert check_names({}) == [] and check_names({"knn": np.zeros(2, bool)}) == [None, None]
    guard.method = "msp"
    assert set(guard.check_scores(logits, cases["knn"])) == {"msp"}


def test_widening_with_a_labs_images_keeps_the_thresholds_and_accepts_only_those():
    """`widen_guard`: a lab's images (a cloud apart from the training one) join the references; its thresholds
    stay, so images like the lab's pass and images far from both stay flagged."""
    from leukray.ood import widen_guard

    rng = np.random.default_rng(5)
    centre, lab_centre = rng.normal(size=16), rng.normal(size=16)
    centre, lab_centre = 12 * centre / np.linalg.norm(centre), 12 * lab_centre / np.linalg.norm(lab_centre)
    sig = lambda n: rng.normal(0.5, 0.01, (n, 7))  # noqa: E731  colour signatures near one stain
    train, val = _cloud(rng, 200, centre, 0.3), np.c_[_cloud(rng, 50, centre, 0.3), sig(50)]
    guard = fit_guard(train, rng.normal(size=(50, 4)), val, 1.0, OODConfig(k=5), pooled_dim=16,
                      colour_reference=sig(400), colour_val=sig(50))
    lab, lab_new = np.c_[_cloud(rng, 200, lab_centre, 0.3), sig(200)], np.c_[_cloud(rng, 20, lab_centre, 0.3), sig(20)]
    far = np.c_[_cloud(rng, 20, -centre - lab_centre, 0.3), sig(20)]
    logits = np.zeros((20, 4))
    assert not guard.in_distribution(guard.scores(logits, lab_new)).any()  # another lab: flagged before
    wide = widen_guard(guard, lab, 0.8, {"lab_samples": [{"n": 200}]})
    assert wide.thresholds == guard.thresholds and wide.colour_threshold == guard.colour_threshold
    assert wide.structure_threshold == guard.structure_threshold and wide.temperature == 0.8
    assert len(wide.reference) == 400 and len(wide.colour_reference) == len(guard.colour_reference) + 200
    assert wide.in_distribution(wide.scores(logits, lab_new)).all()  # now in distribution
    assert not wide.in_distribution(wide.scores(logits, far)).any()  # far from both: still flagged
    assert wide.card()["lab_samples"] == [{"n": 200}] and wide.card()["reference"]["n"] == 400
    # the drift report's medians: the lab's images, each without itself, now say what is typical; more of the lab's
    # images lie above them about half the time (the package's validation medians would put all of them above)
    lab_logits = np.repeat(np.eye(4) * 5, 50, axis=0)
    wide = widen_guard(guard, lab, 0.8, {"lab_samples": [{"n": 200}]}, logits=lab_logits)
    med = wide.card()["score_median"]
    assert med["n_val"] == 200 and med["fitted_on"].startswith("the lab's sample")
    more = np.c_[_cloud(rng, 400, lab_centre, 0.3), sig(400)]
    more_logits = np.repeat(np.eye(4) * 5, 100, axis=0)
    assert guard.above_median(guard.scores(more_logits, more), more_logits.argmax(1)).mean() == 1.0
    assert wide.above_median(wide.scores(more_logits, more), more_logits.argmax(1)).mean() == \
        pytest.approx(0.5, abs=0.1)
    with_self = score_medians(wide.scores(lab_logits, lab), lab_logits.argmax(1), 4)  # what leaving out avoids
    assert with_self["all"] < med["all"]


def test_reference_colour_copies_accept_another_labs_camera():
    """The knn reference with copies of the training images in other labs' colours: the copies are recorded,
    seeded, and an image under another camera's white balance that a colour-sensitive feature puts outside the
    plain reference lands inside the one with copies."""
    import torch

    from leukray import colour
    from leukray.train import guard_reference

    images = _smears(64)
    train, val = images[:48], images[48:]

    def features_of(batch: np.ndarray) -> np.ndarray:  # a feature that sees colour: mean OD per channel
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
        return (-torch.log((x / 255).clamp(1 / 255, 1))).mean((2, 3)).numpy()

    plain, made0 = guard_reference(features_of, train, OODConfig(reference_colour_copies=0), "none", 1.0, 1.0, 0)
    ref, made = guard_reference(features_of, train, OODConfig(reference_colour_copies=8), "none", 1.0, 1.0, 0)
    assert made0["colour_copies"] == 0 and made["colour_copies"] == 8 and made["n_images"] == 48
    assert len(plain) == 48 and len(ref) == 9 * 48
    np.testing.assert_array_equal(ref[:48], plain)  # the images as they are come first
    assert np.abs(ref[48:96] - plain).max() > 0.05  # the copies' colours differ
    again, _ = guard_reference(features_of, train, OODConfig(reference_colour_copies=8), "none", 1.0, 1.0, 0)
    np.testing.assert_array_equal(again, ref)  # seeded

    warm = (colour.camera_gains(torch.from_numpy(val).permute(0, 3, 1, 2).float() / 255,
                                torch.tensor([1.25, 1.0, 0.8])) * 255).round().permute(0, 2, 3, 1).numpy()
    score, flagged = {}, {}
    for name, reference in (("plain", plain), ("copies", ref)):
        cfg = OODConfig(k=3, in_fraction=0.97, colour_check=False)
        guard = fit_guard(reference, np.zeros((len(val), 4)), features_of(val), 1.0, cfg, pooled_dim=3)
        s = guard.scores(np.zeros((len(val), 4)), features_of(warm.astype(np.uint8)))
        score[name], flagged[name] = float(np.median(s)), float((~guard.in_distribution(s)).mean())
    assert score["copies"] < 0.5 * score["plain"] and flagged["copies"] < flagged["plain"], (score, flagged)


def test_degraded_copies_accept_a_defect_the_network_answers_through():
    """The knn reference with copies of the training images under camera defects (`ood.degraded_copies`): recorded,
    seeded, the images as they are first; a blurred image that a sharpness-sensitive feature puts outside the plain
    reference lands inside the one with copies, and a bad count is named."""
    from leukray.perturb import apply_perturbation
    from leukray.train import guard_reference

    images = _smears(64)
    train, val = images[:48], images[48:]

    def features_of(batch: np.ndarray) -> np.ndarray:  # a feature that sees sharpness and brightness
        x = batch.astype(np.float32).mean(3)
        return np.stack([np.abs(np.diff(x, axis=1)).mean((1, 2)), np.abs(np.diff(x, axis=2)).mean((1, 2)),
                         x.mean((1, 2)) / 25], 1)

    cfg = dict(reference_colour_copies=0)
    plain, made0 = guard_reference(features_of, train, OODConfig(**cfg), "none", 1.0, 1.0, 0)
    ref, made = guard_reference(features_of, train, OODConfig(**cfg, degraded_copies=8), "none", 1.0, 1.0, 0)
    assert made0["degraded_copies"] == 0 and made["degraded_copies"] == 8 and len(ref) == 9 * 48
    np.testing.assert_array_equal(ref[:48], plain)
    again, _ = guard_reference(features_of, train, OODConfig(**cfg, degraded_copies=8), "none", 1.0, 1.0, 0)
    np.testing.assert_array_equal(again, ref)

    blurred = apply_perturbation(val, "blur", 2.0)
    flagged = {}
    for name, reference in (("plain", plain), ("copies", ref)):
        guard = fit_guard(reference, np.zeros((len(val), 4)), features_of(val), 1.0,
                          OODConfig(k=3, in_fraction=0.97, colour_check=False), pooled_dim=3)
        scores = guard.scores(np.zeros((len(val), 4)), features_of(blurred))
        flagged[name] = float((~guard.in_distribution(scores)).mean())
    assert flagged["plain"] > 0.5 and flagged["copies"] < flagged["plain"] / 2, flagged
    with pytest.raises(ValueError, match=r"ood.degraded_copies=9 must be in \[0, 8\]"):
        OODConfig(degraded_copies=9)

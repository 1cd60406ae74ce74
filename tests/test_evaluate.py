"""`leukray evaluate`: report contents checked against an independent computation, robustness grid, determinism,
split selection and the errors a user sees."""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from leukray import CLASSES
from leukray.data import DataError, canonical_class
from leukray.evaluate import evaluate
from leukray.robustness import check_families
from leukray.recalibrate import calibrate
from leukray.images import decode_image
from leukray.perturb import PERTURBATIONS
from leukray.registry import RegistryError, load_package
from leukray.split import load_manifest
from reference import package_logits, package_predictions


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny 32 px batches: one intra-op thread is several times faster than oversubscribed ones on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def package(synth_data, tmp_path_factory):
    """A tiny trained package (32 px, untrained backbone, one epoch): fast, and good enough to measure."""
    from leukray.train import TrainConfig, train

    out = tmp_path_factory.mktemp("pkg") / "package"
    cfg = TrainConfig.model_validate({
        "data": {"root": str(synth_data)}, "image_size": 32, "model": {"weights": "none"},
        "epochs": 1, "batch_size": 16, "augment": "none", "seed": 0, "num_threads": 1})
    train(cfg, str(out))
    return out


@pytest.fixture(scope="module")
def report(package, synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run1"
    return out, evaluate(str(package), str(synth_data), str(out), robustness=True, seed=3, batch_size=32,
                         backend="torch")


def independent_accuracy(package: Path, data: Path, rel_paths: list[str]) -> float:
    """Decode the files directly, run the package's torch model over its test-time views, argmax vs the labels."""
    pkg = load_package(str(package))
    images = np.stack([decode_image((data / p).read_bytes(), pkg.image_size) for p in rel_paths])
    labels = np.array([pkg.classes.index(canonical_class(p.split("/")[0])) for p in rel_paths])
    return float((package_logits(pkg, images).argmax(1) == labels).mean())


def test_report_contents(report, package, synth_data):
    out, r = report
    on_disk = json.loads((out / "evaluation.json").read_text())
    assert on_disk["accuracy"] == r["accuracy"]
    for key in ("accuracy", "macro_f1", "n", "model", "data", "split", "split_manifest", "metrics", "review",
                "robustness", "wall_time_s"):
        assert key in on_disk, key
    m = r["metrics"]
    for key in ("per_class", "macro", "weighted", "confusion_matrix", "roc_auc_ovr", "ece", "benign_vs_malignant"):
        assert key in m, key
    assert set(m["per_class"]) == set(CLASSES)

    # the package's test split, and only it
    manifest = load_manifest(str(package / "split.parquet"))
    test_paths = sorted(p for p, s in zip(manifest["path"].to_pylist(), manifest["split"].to_pylist()) if s == "test")
    assert r["split"] == "test" and r["n"] == len(test_paths) > 0
    assert r["same_split_as_training"] is True
    assert r["accuracy"] == pytest.approx(independent_accuracy(package, Path(synth_data), test_paths), abs=1e-12)
    assert r["tta"] == r["tta_package"] == "dihedral8"  # the trainer's default, recorded in the card

    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (len(CLASSES), len(CLASSES)) and cm.sum() == r["n"]
    assert np.trace(cm) / cm.sum() == pytest.approx(r["accuracy"])
    assert r["model"]["name"] and r["model"]["version"]

    rev = r["review"]
    assert rev["threshold"] == 0.8 and rev["threshold_source"] == "default"
    assert {row["threshold"] for row in rev["tradeoff"]} >= {0.5, 0.8, 0.99}
    assert 0.0 <= rev["flagged_fraction"] <= 1.0
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["path"] for row in rows] == test_paths
    pkg = load_package(str(package))
    images = np.stack([decode_image((Path(synth_data) / p).read_bytes(), pkg.image_size) for p in test_paths])
    expected = torch.softmax(torch.from_numpy(package_logits(pkg, images)) / pkg.temperature, 1).max(1).values
    np.testing.assert_allclose([float(row["confidence"]) for row in rows], expected.numpy(), atol=1e-5, rtol=0)
    assert sum(row["needs_review"] == "True" for row in rows) == rev["n_flagged"]

    for png in ("confusion_matrix.png", "reliability.png", "samples.png"):
        assert (out / png).stat().st_size > 1000, png


def test_robustness_grid(report):
    out, r = report
    rob = r["robustness"]
    expected = {(name, sev) for name, sevs in PERTURBATIONS.items() for sev in sevs}
    got = {(row["perturbation"], row["severity"]) for row in rob["results"]}
    assert got == expected and len(rob["results"]) == len(expected)
    for row in rob["results"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0 and row["n"] == r["n"]
    assert rob["clean"]["accuracy"] == pytest.approx(r["accuracy"])
    assert rob["worst"]["accuracy"] == min(row["accuracy"] for row in rob["results"])
    assert set(rob["by_perturbation"]) == set(PERTURBATIONS)
    with open(out / "robustness.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(expected)
    assert {"perturbation", "severity", "accuracy", "macro_f1", "shift"} <= set(table[0])
    # the shift against the validation medians: a fraction of the clean split and of every setting, the clean one the
    # same in the report's guard summary and in the suite's
    assert r["ood"]["shift"] is not None and 0.0 <= r["ood"]["shift"] <= 1.0
    assert all(0.0 <= row["shift"] <= 1.0 for row in rob["results"]) and rob["clean"]["shift"] == r["ood"]["shift"]


def test_deterministic_for_a_seed(report, package, synth_data, tmp_path):
    _, first = report
    again = evaluate(str(package), str(synth_data), str(tmp_path / "run2"), robustness=True, seed=3, batch_size=32,
                     plots=False, backend="torch")
    assert again["robustness"]["results"] == first["robustness"]["results"]
    assert again["metrics"] == first["metrics"]


def test_a_subset_of_families_gives_the_full_suites_numbers(report, package, synth_data, tmp_path):
    """`--perturbations`: only the named families, in the suite's order, each setting with the same images (seeded
    per setting and chunk) and so the same numbers as in the full suite; an unknown family is named before any work."""
    _, full = report
    some = evaluate(str(package), str(synth_data), str(tmp_path / "some"), seed=3, batch_size=32, plots=False,
                    backend="torch", perturbations=["impulse_noise", "hue"])
    rows = some["robustness"]["results"]
    assert [r["perturbation"] for r in rows] == ["hue"] * len(PERTURBATIONS["hue"]) + \
        ["impulse_noise"] * len(PERTURBATIONS["impulse_noise"])
    same = [r for r in full["robustness"]["results"] if r["perturbation"] in ("hue", "impulse_noise")]
    guard = ("ood_fraction", "ood_by_check", "shift")  # a knn distance right at a threshold may round either way
    assert [{k: v for k, v in r.items() if k not in guard} for r in rows] == \
        [{k: v for k, v in r.items() if k not in guard} for r in same]
    for r, s in zip(rows, same):
        assert abs(r["ood_fraction"] - s["ood_fraction"]) <= 1 / r["n"] + 1e-9
        assert abs(r["shift"] - s["shift"]) <= 2 / r["n"] + 1e-9
    assert set(some["robustness"]["by_perturbation"]) == {"hue", "impulse_noise"}
    with pytest.raises(ValueError, match=r"unknown perturbation family 'fog'; allowed: hue, saturation"):
        evaluate(str(package), str(synth_data), str(tmp_path / "bad"), perturbations=["hue", "fog"])
    assert not (tmp_path / "bad").exists()


def test_severities_past_the_suites(report, package, synth_data, tmp_path):
    """`--perturbations FAMILY=S1,S2`: these severities instead of the suite's; one the suite has gives the full
    suite's numbers (the same images), one past it is scored; a severity out of the family's range or not a number
    is named before any work."""
    _, full = report
    past = evaluate(str(package), str(synth_data), str(tmp_path / "past"), seed=3, batch_size=32, plots=False,
                    backend="torch", perturbations=["magnification=2,0.8"])
    rows = past["robustness"]["results"]
    assert [(r["perturbation"], r["severity"]) for r in rows] == [("magnification", 2), ("magnification", 0.8)]
    suite_row = next(r for r in full["robustness"]["results"] if (r["perturbation"], r["severity"]) == ("magnification", 0.8))
    guard = ("ood_fraction", "ood_by_check", "shift")
    assert {k: v for k, v in rows[1].items() if k not in guard} == {k: v for k, v in suite_row.items() if k not in guard}
    assert rows[0]["n"] == suite_row["n"]
    assert past["robustness"]["by_perturbation"]["magnification"]["worst_severity"] in (2, 0.8)
    assert check_families(["blur=4", "hue", "blur"]) == {"hue": PERTURBATIONS["hue"],
                                                          "blur": (4,) + tuple(s for s in PERTURBATIONS["blur"] if s != 4)}
    with pytest.raises(ValueError, match=r"perturbation 'magnification=3'.*magnification.*2"):
        evaluate(str(package), str(synth_data), str(tmp_path / "bad"), perturbations=["magnification=3"])
    with pytest.raises(ValueError, match=r"perturbation 'blur=strong': severities must be numbers"):
        check_families(["blur=strong"])
    for spec in ("jpeg=inf", "webp=nan", "webp=20.5"):  # a codec's quality is a whole number, named when it is not
        with pytest.raises(ValueError, match=rf"perturbation '{spec}': {spec[:4]} quality must be an integer"):
            check_families([spec])
    assert not (tmp_path / "bad").exists()


def test_openvino_backend_matches_torch(report, package, synth_data, tmp_path):
    """The CPU default runs the package's ONNX graph under OpenVINO: the same probabilities to ~1e-6, hence the
    same class wherever PyTorch's top two are not tied, and a robustness suite with the same grid."""
    out, torch_report = report
    assert torch_report["backend"] == "torch cpu"
    r = evaluate(str(package), str(synth_data), str(tmp_path / "ov"), robustness=True, seed=3, batch_size=32,
                 plots=False)
    assert r["backend"] == "openvino f32"
    pkg = load_package(str(package))
    rows_t = list(csv.DictReader(open(out / "predictions.csv")))
    rows_o = list(csv.DictReader(open(tmp_path / "ov" / "predictions.csv")))
    assert [x["path"] for x in rows_t] == [x["path"] for x in rows_o]
    images = np.stack([decode_image((Path(synth_data) / x["path"]).read_bytes(), pkg.image_size) for x in rows_t])
    top2 = torch.softmax(torch.from_numpy(package_logits(pkg, images)) / pkg.temperature, 1).topk(2).values.numpy()
    for a, b, (p1, p2) in zip(rows_t, rows_o, top2):
        assert abs(float(a["confidence"]) - float(b["confidence"])) < 1e-4
        assert a["predicted"] == b["predicted"] or p1 - p2 < 1e-4  # only a tie may go either way
    assert [(x["perturbation"], x["severity"]) for x in r["robustness"]["results"]] == \
        [(x["perturbation"], x["severity"]) for x in torch_report["robustness"]["results"]]
    with pytest.raises(ValueError, match="allowed: auto, torch, openvino"):
        evaluate(str(package), str(synth_data), str(tmp_path / "bad"), backend="onnx")


def test_split_selection(package, synth_data, tmp_path):
    from leukray.synth import make_dataset

    # the same file names with other content: nothing here was trained on, so every image is evaluated
    other = make_dataset(tmp_path / "other", per_class=3, size=64, seed=1)
    r = evaluate(str(package), str(other), str(tmp_path / "o"), plots=False)
    assert r["split"] == "all" and r["n"] == 12 and r["split_manifest"] is None
    assert not (tmp_path / "o" / "samples.png").exists() and (tmp_path / "o" / "evaluation.json").exists()
    assert np.array(r["metrics"]["confusion_matrix"]).sum() == 12
    # an explicit manifest that does not cover the data is an error, not a silent fallback
    with pytest.raises(DataError, match="does not cover"):
        evaluate(str(package), str(other), str(tmp_path / "o2"), split_manifest=str(package / "split.parquet"))
    # --split all on the training data: every image, and the report says it includes training rows
    r = evaluate(str(package), str(synth_data), str(tmp_path / "a"), split="all", plots=False)
    assert r["split"] == "all" and r["n"] == sum(1 for _ in Path(synth_data).rglob("*.jpg"))
    assert "training rows" in r["split_source"]


def test_bad_model_ref(synth_data, tmp_path):
    with pytest.raises(RegistryError, match="no model package"):
        evaluate(str(tmp_path / "nope"), str(synth_data), str(tmp_path / "out"))


def test_unknown_class_folder(package, synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    (data / "Monocyte").mkdir()
    shutil.copy(next((data / "Benign").glob("*.jpg")), data / "Monocyte" / "m.jpg")
    with pytest.raises(DataError, match="Monocyte"):
        evaluate(str(package), str(data), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli(package, synth_data, tmp_path, capsys):
    from leukray.cli import main

    from leukray.registry import publish

    publish(str(package), str(tmp_path / "registry"), "leuk")  # a model folder: LATEST → v0001
    out = tmp_path / "cli"
    assert main(["evaluate", "--model", str(tmp_path / "registry" / "leuk"), "--data", str(synth_data),
                 "--out", str(out), "--review-threshold", "0.9"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "leuk" and summary["version"] == "v0001"
    assert summary["split"] == "test" and summary["review"]["threshold"] == 0.9
    assert os.path.exists(out / "evaluation.json") and not os.path.exists(out / "robustness.csv")
    assert main(["evaluate", "--model", str(tmp_path / "nope"), "--data", str(synth_data), "--out", str(out)]) == 2
    assert "no model package" in capsys.readouterr().err


def val_logits(package: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The package's val rows decoded directly and run through its torch model."""
    pkg = load_package(str(package))
    manifest = load_manifest(str(package / "split.parquet"))
    rel = sorted(p for p, s in zip(manifest["path"].to_pylist(), manifest["split"].to_pylist()) if s == "val")
    images = np.stack([decode_image((data / p).read_bytes(), pkg.image_size) for p in rel])
    labels = np.array([pkg.classes.index(canonical_class(p.split("/")[0])) for p in rel])
    return package_logits(pkg, images), labels


def test_calibrate(package, synth_data, tmp_path, capsys):
    """A package shipped with a degenerate temperature (0.05: every confidence ~1) gets the temperature fitted on
    its val rows; weights and graph are copied byte for byte, so accuracy cannot move; the card says what changed."""
    from leukray.calibration import fit_temperature
    from leukray.cli import main

    sharp = tmp_path / "sharp"
    shutil.copytree(package, sharp)
    card = json.loads((sharp / "model_card.json").read_text())
    (sharp / "model_card.json").write_text(json.dumps(card | {"temperature": 0.05}))

    out = tmp_path / "recalibrated"
    r = calibrate(str(sharp), str(synth_data), str(out), backend="torch")
    logits, labels = val_logits(package, Path(synth_data))
    assert r["split"] == "val" and r["n"] == len(labels)
    assert r["errors"] == int((logits.argmax(1) != labels).sum())
    assert r["temperature"] == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    assert r["temperature_before"] == 0.05 and r["nll"] < r["nll_before"]
    new_card = json.loads((out / "model_card.json").read_text())
    assert new_card["temperature"] == r["temperature"] and new_card["calibration"]["source_package"] == str(sharp)
    for f in ("model.pt", "model.onnx", "split.parquet"):
        assert (out / f).read_bytes() == (sharp / f).read_bytes(), f
    before = evaluate(str(sharp), str(synth_data), str(tmp_path / "e1"), plots=False, backend="torch")
    after = evaluate(str(out), str(synth_data), str(tmp_path / "e2"), plots=False, backend="torch")
    assert after["accuracy"] == before["accuracy"] and after["model"]["temperature"] == r["temperature"]

    # the CLI; writing over the source package is refused, and nothing is written
    assert main(["calibrate", "--model", str(sharp), "--data", str(synth_data), "--out", str(tmp_path / "c"),
                 "--backend", "torch"]) == 0
    assert json.loads(capsys.readouterr().out)["temperature"] == pytest.approx(r["temperature"], rel=1e-6)
    assert main(["calibrate", "--model", str(sharp), "--data", str(synth_data), "--out", str(sharp)]) == 2
    assert "is the package itself" in capsys.readouterr().err
    assert json.loads((sharp / "model_card.json").read_text())["temperature"] == 0.05


def test_calibrate_on_a_labs_own_folder_uses_every_image(package, tmp_path):
    """A lab's labelled folder (or `leukray review export-labelled`'s) is not in the package's split manifest: the
    default split takes every image of it, and the guard keeps its reference from the package."""
    from leukray.synth import make_dataset

    lab = make_dataset(tmp_path / "lab", per_class=3, size=48, seed=11)
    r = calibrate(str(package), str(lab), str(tmp_path / "lab-cal"), backend="torch")
    assert r["split"] == "all" and r["n"] == 12
    card = json.loads((tmp_path / "lab-cal" / "model_card.json").read_text())
    assert card["ood"]["reference_split"].startswith("the reference of")
    # the guard is widened, not refitted: the lab's images join its references, every threshold stays the package's
    before = json.loads((Path(package) / "model_card.json").read_text())["ood"]
    assert card["ood"]["thresholds"] == before["thresholds"]
    assert card["ood"]["colour"]["threshold"] == before["colour"]["threshold"]
    assert card["ood"]["structure"]["threshold"] == before["structure"]["threshold"]
    assert card["ood"]["reference"]["n"] == before["reference"]["n"] + 12
    assert card["ood"]["colour"]["reference"]["n"] == before["colour"]["reference"]["n"] + 12
    assert [s["n"] for s in card["ood"]["lab_samples"]] == [12] and r["ood"]["reference_added"] == 12
    assert 0.0 <= r["ood"]["flagged_before"] <= 1.0
    # the drift report's medians now come from the lab's 12 images
    med = card["ood"]["score_median"]
    assert med["n_val"] == 12 and len(med["by_class"]) == 4 and med["fitted_on"].startswith("the lab's sample")
    assert "fitted_on" not in before["score_median"]
    # the lab's own images are no further from the widened reference than from the package's
    ev_before = evaluate(str(package), str(lab), str(tmp_path / "ev-before"), plots=False, backend="torch")
    ev_after = evaluate(str(tmp_path / "lab-cal"), str(lab), str(tmp_path / "ev-after"), plots=False, backend="torch")
    assert ev_after["ood"]["flagged_fraction"] <= ev_before["ood"]["flagged_fraction"]


def test_tta_override_and_a_package_calibrated_for_it(package, synth_data, tmp_path, capsys):
    """`tta none` on a dihedral8 package: one view, the package's temperature, a warning that says how to refit;
    `calibrate --tta none` writes a package whose temperature is fitted on single-view val logits."""
    from leukray.calibration import fit_temperature
    from leukray.cli import main

    pkg = load_package(str(package))
    r = evaluate(str(package), str(synth_data), str(tmp_path / "e"), plots=False, backend="torch", tta="none")
    assert r["tta"] == "none" and r["tta_package"] == "dihedral8"
    assert "leukray calibrate --tta none" in capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    images = np.stack([decode_image((Path(synth_data) / x["path"]).read_bytes(), pkg.image_size) for x in rows])
    single = torch.softmax(torch.from_numpy(package_logits(pkg, images, "none")) / pkg.temperature, 1)
    np.testing.assert_allclose([float(x["confidence"]) for x in rows], single.max(1).values.numpy(), atol=1e-5, rtol=0)

    assert main(["calibrate", "--model", str(package), "--data", str(synth_data), "--out", str(tmp_path / "one"),
                 "--backend", "torch", "--tta", "none"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tta_before"] == "dihedral8" and out["tta"] == "none"
    _, labels = val_logits(package, Path(synth_data))
    manifest = load_manifest(str(package / "split.parquet"))
    rel = sorted(p for p, s in zip(manifest["path"].to_pylist(), manifest["split"].to_pylist()) if s == "val")
    val_images = np.stack([decode_image((Path(synth_data) / p).read_bytes(), pkg.image_size) for p in rel])
    assert out["temperature"] == pytest.approx(fit_temperature(package_logits(pkg, val_images, "none"), labels), rel=1e-3)
    one = load_package(str(tmp_path / "one"))
    assert one.card["tta"] == "none" and one.temperature == out["temperature"]
    again = evaluate(str(tmp_path / "one"), str(synth_data), str(tmp_path / "e2"), plots=False, backend="torch")
    assert again["tta"] == again["tta_package"] == "none" and again["metrics"]["confusion_matrix"] == r["metrics"]["confusion_matrix"]
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(package), "--data", str(synth_data), "--out", str(tmp_path / "x"), "--tta", "d8"])
    assert "invalid choice: 'd8'" in capsys.readouterr().err


def test_calibrate_adds_degraded_copies_to_the_guards_reference(package, synth_data, tmp_path, capsys):
    """`leukray calibrate --ood-degraded-copies 1`: the knn reference gains one copy of each training image under a
    camera defect, the card says so, and a later calibrate without the flag keeps it."""
    from leukray.cli import main

    assert main(["calibrate", "--model", str(package), "--data", str(synth_data), "--out", str(tmp_path / "deg"),
                 "--backend", "torch", "--ood-degraded-copies", "1"]) == 0
    ood = load_package(str(tmp_path / "deg")).card["ood"]
    made = ood["reference_made"]
    assert made["degraded_copies"] == 1 and ood["reference"]["n"] == (2 + made["colour_copies"]) * made["n_images"]
    assert main(["calibrate", "--model", str(tmp_path / "deg"), "--data", str(synth_data), "--out",
                 str(tmp_path / "again"), "--backend", "torch"]) == 0
    assert load_package(str(tmp_path / "again")).card["ood"]["reference_made"]["degraded_copies"] == 1
    capsys.readouterr()


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_adaptive_package_rows_match_the_reference(recipe_package, synth_data, tmp_path, backend):
    """A default-recipe package (tta adaptive) evaluated on every image of the data, with PyTorch and with the CPU
    default (OpenVINO): each prediction row is the reference's cascade from the card — class, confidence with the
    path's temperature, views — and the report's accuracy and re-scored fraction are the reference's."""
    pkg = load_package(str(recipe_package))
    other = Path(synth_data)
    r = evaluate(str(recipe_package), str(other), str(tmp_path / "e"), split="all", plots=False, backend=backend)
    assert r["tta"] == r["tta_package"] == "adaptive" and r["split"] == "all"
    rows = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    images = np.stack([decode_image((other / x["path"]).read_bytes(), pkg.image_size) for x in rows])
    want = package_predictions(pkg, images)
    assert [x["predicted"] for x in rows] == [pkg.classes[i] for i in want.predicted]
    assert [int(x["views"]) for x in rows] == want.views.tolist()
    assert 0 < (want.views == 8).sum() < len(rows)  # both paths
    np.testing.assert_allclose([float(x["confidence"]) for x in rows], want.confidence, atol=1e-4, rtol=0)
    labels = np.array([pkg.classes.index(canonical_class(x["path"].split("/")[0])) for x in rows])
    assert r["accuracy"] == pytest.approx(float((want.predicted == labels).mean()), abs=1e-12)
    assert r["views"]["rescored_fraction"] == pytest.approx(float((want.views == 8).mean()))
    assert r["views"]["mean"] == pytest.approx(float(want.views.mean()))


def test_s3(report, package, synth_data, s3):
    """Package, data and output on s3:// (a moto server on 127.0.0.1): the same numbers as the local run."""
    from leukray.config import StorageOptions

    endpoint, client = s3
    for prefix, root in (("pkg", Path(package)), ("data", Path(synth_data))):
        for f in root.rglob("*"):
            if f.is_file():
                client.upload_file(str(f), "lab", f"{prefix}/{f.relative_to(root).as_posix()}")
    r = evaluate("s3://lab/pkg", "s3://lab/data", "s3://lab/eval", storage=StorageOptions(endpoint_url=endpoint),
                 plots=False)
    assert r["split"] == "test" and r["split_manifest"] == "s3://lab/pkg/split.parquet"
    assert r["metrics"]["confusion_matrix"] == report[1]["metrics"]["confusion_matrix"]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="lab", Prefix="eval/")["Contents"]}
    assert {"eval/evaluation.json", "eval/predictions.csv"} <= keys
    # recalibration, S3 to S3: the same temperature as fitted locally
    c = calibrate("s3://lab/pkg", "s3://lab/data", "s3://lab/pkg-cal", storage=StorageOptions(endpoint_url=endpoint),
                  backend="torch")
    logits, labels = val_logits(package, Path(synth_data))
    from leukray.calibration import fit_temperature

    assert c["temperature"] == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    card = json.loads(client.get_object(Bucket="lab", Key="pkg-cal/model_card.json")["Body"].read())
    assert card["temperature"] == c["temperature"] and card["calibration"]["source_package"] == "s3://lab/pkg"


def test_an_unreadable_image_is_left_out_and_named(package, tmp_path):
    """A lab's labelled folder with a corrupt file: every other image is evaluated; the report names the file."""
    from leukray.synth import make_dataset

    lab = make_dataset(tmp_path / "lab", per_class=3, size=48, seed=12)
    (lab / "Pre" / "truncated.jpg").write_bytes((next((lab / "Pre").glob("*.jpg"))).read_bytes()[:200])
    r = evaluate(str(package), str(lab), str(tmp_path / "out"), plots=False, backend="torch")
    assert r["n"] == 12 and list(r["unreadable"]) == ["Pre/truncated.jpg"]
    assert "truncated" in r["unreadable"]["Pre/truncated.jpg"] or "corrupt" in r["unreadable"]["Pre/truncated.jpg"]
    saved = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert saved["unreadable"] == r["unreadable"]
    with open(tmp_path / "out" / "predictions.csv") as fh:
        assert "truncated.jpg" not in fh.read()
    cal = calibrate(str(package), str(lab), str(tmp_path / "cal"), backend="torch")
    assert cal["n"] == 12 and list(cal["unreadable"]) == ["Pre/truncated.jpg"]

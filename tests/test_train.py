import json
import os

import numpy as np
import pytest

from leukray.config import load_config
from leukray.registry import load_package
from leukray.train import TrainConfig, fit, prepare_data, train


def _cfg(root, **kw):
    base = {"data.root": str(root), "image_size": 48, "epochs": 2, "batch_size": 16, "model.weights": "imagenet",
            "augment": "study", "lr": 1e-3, "warmup_epochs": 0, "eval_batch_size": 64}
    base.update(kw)
    return load_config(TrainConfig, None, base)


@pytest.fixture(scope="module")
def bigger_data(tmp_path_factory):
    from leukray.synth import make_dataset
    return make_dataset(tmp_path_factory.mktemp("synth50") / "data", per_class=50, size=64, seed=1)


@pytest.fixture(scope="module")
def trained(bigger_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("train-out")
    card = train(_cfg(bigger_data, epochs=3), str(out))
    return out, card


def test_short_train_beats_chance(trained):
    out, card = trained
    test = card["metrics"]["test"]
    assert test["n"] > 0
    assert test["accuracy"] >= 0.6, test  # 4 classes: chance is 0.25


def test_outputs_written(trained):
    out, card = trained
    for f in ("model.pt", "model.onnx", "model_card.json", "metrics.json", "history.json", "curves.png",
              "confusion_matrix.png", "config.yaml", "split.parquet"):
        assert (out / f).stat().st_size > 0, f
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert {"train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_macro_precision", "val_macro_recall"} <= set(hist[0])
    assert card["classes"] == ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]
    assert card["config"]["image_size"] == 48
    assert len(card["split_manifest_hash"]) == 16
    assert card["temperature"] > 0
    val = card["metrics"]["val"]
    cal = card["calibration"]
    assert cal["split"] == "val" and cal["n"] == val["n"]
    assert card["tta"] == cal["tta"] == card["config"]["tta"] == "dihedral8"
    assert cal["errors"] == val["n"] - int(np.trace(np.array(val["confusion_matrix"])))


def test_package_loads_and_predicts_like_training(trained, bigger_data):
    out, card = trained
    pkg = load_package(str(out))
    cfg = _cfg(bigger_data)
    data = prepare_data(cfg, manifest_uri=str(out / "split.parquet"))  # reuses the saved split
    from reference import package_predictions  # the card's test metrics are in the card's test-time mode
    want = package_predictions(pkg, np.ascontiguousarray(data.images[data.indices("test")]))
    acc = float((want.predicted == data.labels[data.indices("test")]).mean())
    assert acc == pytest.approx(card["metrics"]["test"]["accuracy"])


def _split_images(pkg, data_root, split: str):
    """A package's split rows (its manifest), decoded as scoring decodes them, and their labels."""
    from leukray.data import canonical_class
    from leukray.images import decode_image
    from leukray.split import load_manifest

    m = load_manifest(os.path.join(pkg.uri, "split.parquet"))
    rel = sorted(p for p, s in zip(m["path"].to_pylist(), m["split"].to_pylist()) if s == split)
    x = np.stack([decode_image((data_root / p).read_bytes(), pkg.image_size) for p in rel])
    return x, np.array([pkg.classes.index(canonical_class(p.split("/")[0])) for p in rel])


def test_default_recipe_fits_the_adaptive_cascade_as_calibrate_does(recipe_package, synth_data, tmp_path):
    """configs/train.yaml ships tta adaptive: training fits the cascade threshold and both path temperatures on
    val with the code `leukray calibrate --tta adaptive` runs (the same numbers on the same rows), and the card's
    val and test metrics are those of the reference's cascade written from the card."""
    from reference import package_predictions

    from leukray.recalibrate import calibrate

    pkg = load_package(str(recipe_package))
    card = pkg.card
    ad = card["adaptive"]
    assert card["tta"] == card["calibration"]["tta"] == card["config"]["tta"] == "adaptive"
    assert ad["split"] == "val" and ad["full"] == "dihedral8" and card["temperature"] == ad["temperature_full"]
    assert ad["temperature_one_view"] != ad["temperature_full"]
    assert card["ood"]["reference_split"] == "train"
    made = card["ood"]["reference_made"]  # the training images and one copy of each in another lab's colours
    assert made["colour_copies"] == 1 and card["ood"]["reference"]["n"] == 2 * made["n_images"] > 0
    calibrate(str(recipe_package), str(synth_data), str(tmp_path / "cal"), tta="adaptive", backend="torch")
    again = json.loads((tmp_path / "cal" / "model_card.json").read_text())["adaptive"]
    assert again["n"] == ad["n"] == card["metrics"]["val"]["n"]
    for key in ("threshold", "temperature_one_view", "temperature_full", "threshold_exact"):
        assert again[key] == pytest.approx(ad[key], rel=1e-4), key
    for key in ("rescored_fraction", "one_view_full_disagreements", "agreement_with_full"):
        assert again[key] == ad[key], key

    for split in ("val", "test"):
        x, labels = _split_images(pkg, synth_data, split)
        want = package_predictions(pkg, x)
        metrics = card["metrics"][split]
        assert metrics["n"] == len(labels)
        assert metrics["accuracy"] == pytest.approx(float((want.predicted == labels).mean()))
        assert metrics["confusion_matrix"] == [[int(((labels == i) & (want.predicted == j)).sum()) for j in range(4)]
                                               for i in range(4)]
        if split == "val":
            assert ad["rescored_fraction"] == pytest.approx(float((want.views == 8).mean()))
        else:
            assert metrics["mean_views"] == pytest.approx(float(want.views.mean()))
    assert 1 < card["metrics"]["test"]["mean_views"] < 8  # both paths taken on the test split


def test_seeded_runs_are_reproducible(synth_data, tmp_path):
    cfg = _cfg(synth_data, epochs=1, **{"model.weights": "none", "data.limit_per_class": 10})
    data = prepare_data(cfg, manifest_uri=str(tmp_path / "split.parquet"))
    a = fit(cfg, data, verbose=False).history[0]
    b = fit(cfg, data, verbose=False).history[0]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_continues_where_it_stopped(synth_data, tmp_path, ema_decay):
    cfg = _cfg(synth_data, epochs=2, ema_decay=ema_decay, **{"model.weights": "none", "data.limit_per_class": 10})
    data = prepare_data(cfg, manifest_uri=str(tmp_path / "split.parquet"))
    states = []
    full = fit(cfg, data, on_epoch=lambda row, ckpt: states.append(ckpt()), verbose=False)
    import copy
    resumed = fit(cfg, data, resume=copy.deepcopy(states[0]), verbose=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[1]["val_loss"] == pytest.approx(full.history[1]["val_loss"], rel=1e-4)


def test_ema_weights_are_what_is_selected_and_shipped(synth_data, tmp_path):
    import torch
    from leukray.train import predict_logits
    kw = {"model.weights": "none", "data.limit_per_class": 10, "early_stopping_patience": 0}
    cfg = _cfg(synth_data, epochs=2, ema_decay=0.9, **kw)
    data = prepare_data(cfg, manifest_uri=str(tmp_path / "split.parquet"))
    with_ema = fit(cfg, data, verbose=False)
    plain = fit(_cfg(synth_data, epochs=2, **kw), data, verbose=False)
    # same seed, same optimisation: only the validated/shipped weights differ
    assert with_ema.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"], rel=1e-5)
    assert with_ema.history[0]["val_loss"] != pytest.approx(plain.history[0]["val_loss"], rel=1e-3)
    val = data.indices("val")
    logits = predict_logits(with_ema.model, np.ascontiguousarray(data.images[val]), torch.device("cpu"))
    loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(data.labels[val])))
    assert loss == pytest.approx(with_ema.best["val_loss"], rel=1e-4)


def test_consistency_makes_features_stable_under_another_labs_colours(synth_data, tmp_path):
    """consistency > 0: the pooled features of an image in another lab's colours move toward its own, relative to
    how far apart two different images are (what the guard's knn distance sees)."""
    import torch
    from leukray.colour import other_labs
    kw = {"augment": "lab", "augment_p": 0.25, "early_stopping_patience": 0}
    data = prepare_data(_cfg(synth_data, **kw), manifest_uri=str(tmp_path / "split.parquet"))
    images = np.ascontiguousarray(data.images[data.indices("val")])
    shifted = other_labs(images, torch.Generator().manual_seed(7))

    def relative_shift(weight: float) -> float:
        model = fit(_cfg(synth_data, consistency=weight, **kw), data, verbose=False).model.eval()
        with torch.no_grad():
            a, b = (model.forward_with_features(torch.from_numpy(x).permute(0, 3, 1, 2).float())[1][:, :1280]
                    for x in (images, shifted))
        cos = torch.nn.functional.cosine_similarity
        return float((1 - cos(a, b)).mean() / (1 - cos(a, a.roll(1, 0))).mean())

    assert relative_shift(5.0) < 0.8 * relative_shift(0.0)


def test_consistency_needs_a_colour_policy(synth_data):
    with pytest.raises(ValueError, match="consistency=1.0 needs a colour/camera policy.*augment='study'"):
        _cfg(synth_data, consistency=1.0)


def test_manifest_mismatch_is_explained(synth_data, tmp_path):
    cfg = _cfg(synth_data, **{"data.limit_per_class": 5, "model.weights": "none"})
    prepare_data(cfg, manifest_uri=str(tmp_path / "split.parquet"))
    cfg2 = _cfg(synth_data, **{"data.limit_per_class": 6, "model.weights": "none"})
    from leukray.data import DataError
    with pytest.raises(DataError, match="does not match"):
        prepare_data(cfg2, manifest_uri=str(tmp_path / "split.parquet"))


def test_cli_train_reports_errors(tmp_path, capsys):
    from leukray.cli import main
    (tmp_path / "empty").mkdir()
    rc = main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "no images found" in capsys.readouterr().err


def test_train_from_and_to_s3(s3, synth_data, tmp_path):
    """The same run over s3:// (data, split manifest and package on the S3 server) as over local folders."""
    endpoint, client = s3
    for f in synth_data.rglob("*.jpg"):
        client.upload_file(str(f), "lab", f"data/{f.relative_to(synth_data).as_posix()}")
    kw = {"epochs": 1, "model.weights": "none", "data.limit_per_class": 10}
    local = train(_cfg(synth_data, **kw), str(tmp_path / "local"))
    remote = train(_cfg("s3://lab/data", **kw, **{"storage.endpoint_url": endpoint}), "s3://lab/models/run1")
    assert remote["split_manifest_hash"] == local["split_manifest_hash"]
    assert remote["metrics"]["test"]["n"] == local["metrics"]["test"]["n"]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="lab", Prefix="models/run1/")["Contents"]}
    assert {"models/run1/model.pt", "models/run1/model.onnx", "models/run1/model_card.json",
            "models/run1/split.parquet", "models/run1/curves.png"} <= keys
    from leukray.config import StorageOptions
    pkg = load_package("s3://lab/models/run1", StorageOptions(endpoint_url=endpoint))
    assert pkg.classes == ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]


def test_missing_bucket_is_said(s3, synth_data):
    endpoint, _ = s3
    from leukray.data import DataError
    from leukray.storage import StorageError
    cfg = _cfg("s3://no-such-bucket/data", **{"storage.endpoint_url": endpoint, "model.weights": "none"})
    with pytest.raises((StorageError, DataError), match="bucket 'no-such-bucket' does not exist"):
        prepare_data(cfg)


def test_an_unreadable_training_image_is_named_and_left_out(synth_data, tmp_path):
    """A corrupt and an empty file among the class folders: training goes on with every other image, says which
    files it left out and why, and records them in the model card; the split manifest still lists them."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    (data / "Pro" / "000-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (data / "Benign" / "000-empty.png").write_bytes(b"")
    kw = {"epochs": 1, "model.weights": "none", "data.limit_per_class": 10}
    for attempt in ("decoded", "from the cache"):
        prepared = prepare_data(_cfg(data, **kw), manifest_uri=str(tmp_path / "split.parquet"))
        assert list(prepared.unreadable) == ["Benign/000-empty.png", "Pro/000-broken.jpg"], attempt
        paths = prepared.manifest["path"].to_pylist()
        used = {paths[i] for s in ("train", "val", "test") for i in prepared.indices(s)}
        assert len(used) == 38 and not used & set(prepared.unreadable), attempt
    card = train(_cfg(data, **kw), str(tmp_path / "out"))
    assert list(card["unreadable"]) == ["Benign/000-empty.png", "Pro/000-broken.jpg"]
    assert card["unreadable"]["Benign/000-empty.png"].startswith("empty file")
    saved = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert saved["unreadable"] == card["unreadable"]
    assert sum(v for k, v in card["class_counts"].items()) == len(np.flatnonzero(prepared.splits == "train"))


def test_consistency_ce_trains_the_head_on_the_shifted_copy(synth_data, tmp_path):
    """consistency_ce > 0 adds the shifted copy's classification loss: from the same seed and data, the first
    epoch's training loss grows by about that copy's cross-entropy (≈ ln 4 ≈ 1.4 for an untrained head)."""
    kw = {"augment": "lab", "augment_p": 0.25, "consistency": 1.0, "epochs": 1, "early_stopping_patience": 0,
          "model.weights": "none", "data.limit_per_class": 10}
    data = prepare_data(_cfg(synth_data, **kw), manifest_uri=str(tmp_path / "split.parquet"))
    pulled = fit(_cfg(synth_data, **kw), data, verbose=False).history[0]["train_loss"]
    classified = fit(_cfg(synth_data, consistency_ce=1.0, **kw), data, verbose=False).history[0]["train_loss"]
    assert classified > pulled + 0.5


def test_consistency_ce_copy_colour_classifies_a_third_copy_in_other_colours(synth_data, tmp_path, monkeypatch):
    """consistency_ce_copy='colour': each step also draws a copy under the policy's colour part alone (no camera
    part) and that copy, not the fully shifted one, carries the classification loss; 'shifted' draws no third."""
    import leukray.train as train_mod

    calls = []
    real = train_mod.augment_batch

    def spy(x, policy, g=None, strength=1.0, zoom=1.0, p=1.0, geometry=True, camera=True, codecs=("jpeg",)):
        calls.append(camera)
        codecs_seen.add(codecs)
        return real(x, policy, g, strength, zoom, p, geometry, camera, codecs)

    codecs_seen = set()
    monkeypatch.setattr(train_mod, "augment_batch", spy)
    kw = {"augment": "lab_sensor", "augment_p": 0.25, "consistency": 1.0, "consistency_ce": 1.0, "epochs": 1,
          "early_stopping_patience": 0, "model.weights": "none", "data.limit_per_class": 10}
    data = prepare_data(_cfg(synth_data, **kw), manifest_uri=str(tmp_path / "split.parquet"))
    shifted = fit(_cfg(synth_data, augment_codecs=["jpeg", "webp"], **kw), data, verbose=False).history[0]["train_loss"]
    assert calls and all(calls) and len(calls) % 2 == 0  # two draws a step, both with the camera part
    assert codecs_seen == {("jpeg", "webp")}  # every draw re-encodes with the configured codecs
    calls.clear()
    colour = fit(_cfg(synth_data, consistency_ce_copy="colour", **kw), data, verbose=False).history[0]["train_loss"]
    assert len(calls) % 3 == 0 and calls[2::3] == [False] * (len(calls) // 3) and all(calls[0::3] + calls[1::3])
    assert colour != shifted
    with pytest.raises(ValueError, match="consistency_ce_copy' = 'camera'.*'shifted' or 'colour'"):
        _cfg(synth_data, consistency_ce_copy="camera", **kw)


def test_augment_codecs_need_a_policy_that_re_encodes(synth_data):
    assert _cfg(synth_data, augment="lab", augment_codecs="webp").augment_codecs == ("webp",)
    with pytest.raises(ValueError, match="augment_codecs=\\['webp'\\] needs a policy that re-encodes; augment='stain'"):
        _cfg(synth_data, augment="stain", augment_codecs=["webp"])
    with pytest.raises(ValueError, match="augment_codecs: 'avif' is not a codec; allowed: jpeg, webp"):
        _cfg(synth_data, augment="lab", augment_codecs=["jpeg", "avif"])


def test_consistency_ce_copy_needs_consistency_ce(synth_data):
    with pytest.raises(ValueError, match="consistency_ce_copy='colour' needs consistency_ce > 0"):
        _cfg(synth_data, augment="lab", consistency=1.0, consistency_ce_copy="colour")


def test_consistency_ce_needs_consistency(synth_data):
    with pytest.raises(ValueError, match="consistency_ce=0.5 needs consistency > 0"):
        _cfg(synth_data, augment="lab", consistency_ce=0.5)

"""Batch scoring (leukray/score.py, jobs/score.py) end to end via `ray job submit` on a local Ray cluster, over a
local folder and a moto S3 server (both on 127.0.0.1), into the results Delta table: one row per input file (bad
files of every kind become error rows), incremental reruns, stray files invisible and vacuumed, the same rows read
back by DuckDB, by pyarrow through deltalake and by ray.data.read_delta, no leaked secrets, and ONNX predictions
equal to the PyTorch model's (same class, calibrated probabilities within 1e-4)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localcluster import REPO, job_env, make_bucket, read_with_ray, submit_job  # noqa: E402
from reference import package_outputs, package_predictions  # noqa: E402

from leukray import registry, results, storage  # noqa: E402
from leukray.ood import STATS_DIM  # noqa: E402
from leukray.config import ConfigError, StorageOptions, load_config  # noqa: E402
from leukray.images import decode_image, is_image_name  # noqa: E402
from leukray.query import RESULTS_SCHEMA, Results  # noqa: E402
from leukray.inference import softmax as softmax_t  # noqa: E402
from leukray.score import FILE_SCHEMA, ScoreConfig  # noqa: E402
from leukray.synth import make_dataset  # noqa: E402

KEY = "AKIALEUKRAYLEAKTEST7"
SECRET = "sEcReT-leukray-do-not-leak-5f3b9c"
PROB_TOL = 1e-4
THRESHOLD = 0.6

# bad files: name → words the error message must contain
BAD = {
    "bad/empty.jpg": "empty",
    "bad/truncated.jpg": "truncated",
    "bad/text-not-image.jpg": "not an image",
    "bad/garbage.PNG": "not an image",
    "bad/bomb.png": "too large",
}


@pytest.fixture(scope="module")
def package(tiny_package):
    """A tiny trained package, built the way users build one (leukray synth + leukray train)."""
    return str(tiny_package / "pkg")


def _jpeg(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_archive(folder: Path) -> None:
    """Synthetic smears in nested folders with mixed-case extensions and formats, plus every kind of bad file."""
    make_dataset(folder / "day1", per_class=3, size=48, seed=1)
    files = sorted(p for p in (folder / "day1").rglob("*.jpg"))
    files[0].rename(files[0].with_suffix(".JPG"))
    files[1].rename(files[1].with_suffix(".Jpeg"))
    for p, fmt, ext in ((files[2], "PNG", ".png"), (files[3], "TIFF", ".TIF"), (files[4], "BMP", ".bmp")):
        Image.open(p).convert("RGB").save(p.with_suffix(ext), fmt)
        p.unlink()
    # names a camera or a person gives: spaces, glob characters (read literally, never expanded), '#', non-ASCII
    files[5].rename(files[5].with_name("slide 3 [x100] #2 é.jpg"))
    files[6].rename(files[6].with_name("field*?.jpg"))
    (folder / "bad").mkdir()
    (folder / "bad/empty.jpg").write_bytes(b"")
    good = _jpeg(7)
    (folder / "bad/truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "bad/text-not-image.jpg").write_text("lab notes, not a picture\n" * 5)
    (folder / "bad/garbage.PNG").write_bytes(np.random.default_rng(3).bytes(3000))
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, "PNG")  # 81 MP > the decoder's 64 MP limit, ~80 KB on disk
    (folder / "bad/bomb.png").write_bytes(buf.getvalue())
    (folder / "README.txt").write_text("not an image file: ignored\n")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p.name))


@pytest.fixture(scope="module", params=["local", "s3"])
def loc(request, cluster, package, tmp_path_factory):
    """Archive, model reference and output location, local or on the S3 server (model published to a registry
    bucket, resolved through LATEST)."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"score-{kind}")
    archive = tmp / "archive"
    build_archive(archive)
    endpoint = cluster["s3_endpoint"]
    if kind == "local":  # a name in another encoding than UTF-8 (object keys are always UTF-8)
        pro = sorted((archive / "day1" / "Pro").iterdir())[0]
        pro.rename(pro.with_name(os.fsdecode(b"Pro-caf\xe9.jpg")))
        d = {"kind": kind, "archive": archive, "input": str(archive), "output": str(tmp / "out"), "model": package}
    else:
        for b in ("archive", "models", "scores"):
            make_bucket(endpoint, b)
        opts = StorageOptions(endpoint_url=endpoint, key=KEY, secret=SECRET)
        storage.upload_dir(str(archive), "s3://archive/smears", opts)
        registry.publish(package, "s3://models", "leukray-test", opts)
        d = {"kind": kind, "archive": archive, "input": "s3://archive/smears", "output": "s3://scores/out",
             "model": "s3://models/leukray-test"}
    d["tmp"] = tmp
    d["opts"] = StorageOptions(endpoint_url=endpoint, key=KEY, secret=SECRET)
    cfg = {"input": d["input"], "output": d["output"], "model": d["model"],
           "storage": {"endpoint_url": endpoint, "key": KEY, "secret": SECRET},
           "batch_size": 8, "decode_batch_size": 4, "files_per_block": 6, "review_threshold": THRESHOLD}
    d["config"] = tmp / "score.yaml"
    d["config"].write_text(yaml.safe_dump(cfg))
    d["logs"] = []
    return d


def _submit(cluster, loc) -> dict:
    res = submit_job(cluster, [sys.executable, "jobs/score.py", "--config", str(loc["config"])], working_dir=REPO,
                     timeout=600)
    loc["logs"].append(res.stdout)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "files seen" in res.stdout and "img/s" in res.stdout
    return res


def _put(loc, rel: str, data: bytes) -> None:
    p = loc["archive"] / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    if loc["kind"] == "s3":
        storage.write_bytes(f"{loc['input']}/{rel}", data, loc["opts"])


def _uri(loc, p: Path) -> str:
    if loc["kind"] == "local":
        return storage.path_text(str(p))
    return f"{loc['input']}/{p.relative_to(loc['archive']).as_posix()}"


def _results(loc) -> Results:
    return Results(loc["output"], loc["opts"])


def _all_rows(loc) -> pa.Table:
    return _results(loc).dataset.to_table()


# the tests of one location run in order: first run, rerun, incremental run, then checks over everything

def _linear_probe(x_nchw, labels, steps: int):
    """The ImageNet backbone with its head fitted to these images (seconds): logits like a trained model's."""
    import torch

    from leukray.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="imagenet"), 4, None, verbose=False).eval()
    with torch.no_grad():
        feats = torch.flatten(model.pool(model.features(model.preprocess(x_nchw))), 1)
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    model.head.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.head(feats), labels).backward()
        opt.step()
    return model.eval()

def test_first_run_one_row_per_file(cluster, loc):
    _submit(cluster, loc)
    r = _results(loc)
    assert len(r.runs) == 1
    m = r.runs[0].raw
    files = _image_files(loc["archive"])
    t = r.dataset.to_table()
    assert t.num_rows == len(files) == m["counts"]["seen"] == m["rows"]
    assert sorted(t["path"].to_pylist()) == sorted(_uri(loc, p) for p in files)
    assert m["counts"]["errors"] == len(BAD) and m["counts"]["scored"] == len(files) - len(BAD)
    assert m["counts"]["skipped"] == 0 and m["throughput"]["images_per_s"] > 0
    assert m["counts"]["not_images"] == 1  # README.txt: passed over, and counted
    assert m["execution"]["tta"] == "dihedral8"  # `tta: package` → the package's card
    assert m["status"] == "committed" and m["driver"]["result_rows"] == 0 and m["files"] == len(r.files) >= 1
    for f in r.files:
        assert f.startswith(f"run_date={m['run_date']}/part-{m['run_id']}-") and f.endswith(".parquet")
    assert m["model_version"] == ("v0001" if loc["kind"] == "s3" else m["model_version"])
    # error rows name the problem
    errs = {p: e for p, e, s in zip(t["path"].to_pylist(), t["error"].to_pylist(), t["status"].to_pylist())
            if s == "error"}
    for rel, words in BAD.items():
        msg = errs.pop(_uri(loc, loc["archive"] / rel))
        assert words in msg.lower(), (rel, msg)
    assert not errs
    err = t.filter(pc.equal(t["status"], "error"))
    for col in ("predicted_class", "confidence", "prob_benign", "prob_pro_b", "needs_review", "ood_score",
                "in_distribution", "review_reason", "ood_check"):
        assert err[col].null_count == err.num_rows
    ok = t.filter(pc.equal(t["status"], "ok"))
    assert ok["error"].null_count == ok.num_rows
    probs = np.stack([ok[c].to_numpy() for c in ("prob_benign", "prob_early_pre_b", "prob_pre_b", "prob_pro_b")], 1)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(probs.max(1), ok["confidence"].to_numpy())
    # needs_review: low confidence or out of distribution (the package's guard), and the reason says which
    assert ok["ood_score"].null_count == ok["in_distribution"].null_count == 0
    card = registry.load_package(loc["model"], loc["opts"], with_model=False).card
    p_benign = ok["prob_benign"].to_numpy()  # the default benign_malignant_threshold 0.9 joins THRESHOLD
    low = (ok["confidence"].to_numpy() < THRESHOLD) | (np.maximum(p_benign, 1 - p_benign) < 0.9)
    ood = ok["ood_score"].to_numpy() > card["ood"]["threshold"]
    assert ok["in_distribution"].to_pylist() == (~ood).tolist()
    assert ok["needs_review"].to_pylist() == (low | ood).tolist()
    names = {(True, False): "low_confidence", (False, True): "out_of_distribution",
             (True, True): "low_confidence,out_of_distribution", (False, False): None}
    assert ok["review_reason"].to_pylist() == [names[(bool(a), bool(b))] for a, b in zip(low, ood)]
    assert [c is None for c in ok["ood_check"].to_pylist()] == ok["in_distribution"].to_pylist()
    assert m["execution"]["ood"]["method"] == "knn"
    # the drift report's shift: the day's rows above the validation median of their predicted class (the card's)
    med = card["ood"]["score_median"]
    median = {c: med["all"] if v is None else v for c, v in zip(card["classes"], med["by_class"])}
    above = [sc > median[c] for sc, c in zip(ok["ood_score"].to_pylist(), ok["predicted_class"].to_pylist())]
    day = [x for x in r.drift().to_pylist() if x["source"] == "scored"]
    assert len(day) == 1 and day[0]["shift"] == pytest.approx(sum(above) / len(above))
    # schema: the documented one, run_date the table's partition column (not in the data files)
    assert t.schema.equals(RESULTS_SCHEMA), t.schema
    assert r.table.metadata().partition_columns == ["run_date"]
    fs, _ = storage.filesystem(loc["output"], loc["opts"])
    import pyarrow.parquet as pq

    with fs.open(storage.join(loc["output"], r.files[0]).split("://", 1)[-1], "rb") as f:
        assert pq.read_schema(f).remove_metadata().equals(FILE_SCHEMA)


PROBS = ("prob_benign", "prob_early_pre_b", "prob_pre_b", "prob_pro_b")


def check_rows_match_reference(ok: pa.Table, pkg, x: np.ndarray):
    """Ok rows (in the order of the decoded images x) = the reference's rows of the package under its card's
    test-time mode: probabilities, class, confidence, views. Returns the reference's predictions."""
    want = package_predictions(pkg, x)
    got = np.stack([ok[c].to_numpy() for c in PROBS], 1)
    np.testing.assert_allclose(got, want.probs, atol=PROB_TOL, rtol=0)
    np.testing.assert_allclose(ok["confidence"].to_numpy(), want.confidence, atol=PROB_TOL, rtol=0)
    assert ok["predicted_class"].to_pylist() == [pkg.classes[i] for i in want.predicted]
    assert ok["views"].to_pylist() == want.views.tolist()
    return want


def test_predictions_match_pytorch(loc, package):
    """Rows = the PyTorch model averaged over the package's 8 test-time views, then its temperature."""
    pkg = registry.load_package(package)
    t = _all_rows(loc)
    ok = t.filter(pc.equal(t["status"], "ok")).sort_by("path")
    assert ok.num_rows >= 10
    files = {_uri(loc, p): p for p in _image_files(loc["archive"])}
    x = np.stack([decode_image(files[p].read_bytes(), pkg.image_size) for p in ok["path"].to_pylist()])
    want = check_rows_match_reference(ok, pkg, x)
    assert set(want.views) == {8}
    # ood_score: distance to the 10th nearest training feature, or knn's threshold × the square of the colour
    # signature's distance to its 10th nearest accepted signature over the colour threshold, or × the square of the
    # structure threshold over the image's structure (at most 10), whichever is largest; brute force from the files
    outputs = package_outputs(pkg, x)
    feats = outputs[:, 4:4 + 1280]
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    reference = np.load(Path(package) / "ood_reference.npy").astype(np.float64)
    knn = np.sort(np.sqrt(((feats[:, None, :] - reference[None]) ** 2).sum(-1)), axis=1)[:, 9]
    spec = pkg.card["ood"]
    colour_ref = np.load(Path(package) / spec["colour"]["reference"]["file"]).astype(np.float64)
    colour = np.sort(np.sqrt(((outputs[:, 4 + 1280:4 + 1287][:, None, :] - colour_ref[None]) ** 2).sum(-1)), axis=1)[:, 9]
    t, st = spec["thresholds"]["knn"], spec["structure"]["threshold"]
    structure = np.maximum(outputs[:, 4 + 1287], 1e-9)
    checks = {"knn": knn, "colour": t * (colour / spec["colour"]["threshold"]) ** 2,
              "structure": t * np.minimum((st / structure) ** 2, 10.0)}
    expected_score = np.maximum.reduce(list(checks.values()))
    np.testing.assert_allclose(ok["ood_score"].to_numpy(), expected_score, atol=2e-3, rtol=0)
    # ood_check names the checks over the threshold: each named one is at or over it, and a row without a name has
    # every check at or under it (within the backends' tolerance)
    for i, named in enumerate(ok["ood_check"].to_pylist()):
        for name, v in checks.items():
            if named is not None and name in named.split(","):
                assert v[i] > t - 2e-3, (i, name, v[i], t)
            elif named is None:
                assert v[i] <= t + 2e-3, (i, name, v[i], t)


def test_second_run_adds_nothing(cluster, loc):
    before = _all_rows(loc).num_rows
    _submit(cluster, loc)
    r = _results(loc)
    assert len(r.runs) == 2
    m = r.runs[-1].raw
    assert m["counts"]["scored"] == 0 and m["counts"]["errors"] == 0 and m["files"] == 0 and m["rows"] == 0
    assert m["counts"]["skipped"] == m["counts"]["seen"] == before
    assert r.dataset.to_table().num_rows == before


def test_incremental_run_scores_only_new_and_changed(cluster, loc):
    before = _all_rows(loc)
    new = ["day2/Benign/new-1.jpg", "day2/Pro/NEW-2.JPEG"]
    for i, rel in enumerate(new):
        _put(loc, rel, _jpeg(100 + i))
    changed = sorted((loc["archive"] / "day1").rglob("*.jpg"))[0]
    _put(loc, changed.relative_to(loc["archive"]).as_posix(), _jpeg(200))
    # what a run that died before its commit leaves: a data file no commit references
    stray = storage.join(loc["output"], "run_date=2026-01-01", "part-20260101T000000Z-dead00-0123456789ab-0.parquet")
    storage.write_bytes(stray, b"PAR1 crashed", loc["opts"])

    _submit(cluster, loc)
    r = _results(loc)
    m = r.runs[-1].raw
    expected = sorted([_uri(loc, loc["archive"] / rel) for rel in new] + [_uri(loc, changed)])
    t = r.dataset.to_table()
    mine = t.filter(pc.equal(t["run_id"], m["run_id"]))
    assert sorted(mine["path"].to_pylist()) == expected
    assert m["counts"]["scored"] == 3 and m["counts"]["skipped"] == before.num_rows - 1  # all but the changed one
    assert t.num_rows == before.num_rows + 3
    # invisible, and kept by the run's vacuum: younger than vacuum_retention_hours (a running run's files could be)
    assert storage.exists(stray, loc["opts"])
    # the changed file has one row per version; no (path, version) twice
    keys = list(zip(t["path"].to_pylist(), t["source_version"].to_pylist()))
    assert len(keys) == len(set(keys))


def test_reads_back_with_duckdb(loc):
    r = _results(loc)
    n = r.sql("SELECT count(*) AS n FROM results").to_pylist()[0]["n"]
    assert n == len(_image_files(loc["archive"])) + 1  # + the old version of the changed file
    by_status = {x["status"]: x["n"] for x in r.sql("SELECT status, count(*) AS n FROM results GROUP BY status").to_pylist()}
    assert by_status["error"] == len(BAD)
    rows = r.sql("SELECT DISTINCT run_date, model_name FROM results").to_pylist()
    assert len(rows) == 1 and rows[0]["run_date"] == r.runs[0].run_date


def test_three_readers_agree(cluster, loc, tmp_path):
    """DuckDB (leukray.query), pyarrow through deltalake and ray.data.read_delta read the same rows."""
    from deltalake import DeltaTable

    order = [("path", "ascending"), ("run_id", "ascending")]
    duck = _results(loc).sql("SELECT * FROM results").sort_by(order)
    so = results.delta_storage_options(loc["output"], loc["opts"])
    plain = DeltaTable(results.table_uri(loc["output"]), storage_options=so).to_pyarrow_table().sort_by(order)
    via_ray = read_with_ray(cluster, loc["output"], tmp_path).sort_by(order)
    assert duck.num_rows == plain.num_rows == via_ray.num_rows > 0
    for name in RESULTS_SCHEMA.names:
        a = duck[name].to_pylist()
        assert a == plain[name].to_pylist() == via_ray[name].to_pylist(), name


def test_vacuum_removes_stray_files_only(loc):
    """`leukray score --vacuum` with a zero retention (no run in flight) removes the stray file, nothing else."""
    stray = storage.join(loc["output"], "run_date=2026-01-01", "part-20260101T000000Z-dead00-0123456789ab-0.parquet")
    assert storage.exists(stray, loc["opts"])
    before = _all_rows(loc)
    r = subprocess.run([sys.executable, "-m", "leukray.cli", "score", "--config", str(loc["config"]), "--vacuum",
                        "--set", "vacuum_retention_hours=0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["removed"] == 1 and out["files"][0].endswith("dead00-0123456789ab-0.parquet"), out
    assert not storage.exists(stray, loc["opts"])
    assert _all_rows(loc).sort_by("path").equals(before.sort_by("path"))


def test_secrets_never_leak(cluster, loc):
    fs, root = storage.filesystem(loc["output"], loc["opts"])
    fs.invalidate_cache()
    blobs = []
    for f in fs.find(root):
        with fs.open(f, "rb") as fh:
            blobs.append((f, fh.read()))
    assert any("_delta_log/" in f and f.endswith(".json") for f, _ in blobs)
    for f, b in blobs:
        assert SECRET.encode() not in b and KEY.encode() not in b, f
    record = _results(loc).runs[0].raw  # the run's record, as its commits carry it
    assert record["config"]["storage"]["secret"] == "**********"
    for log in loc["logs"]:
        assert SECRET not in log and KEY not in log
    logs_dir = Path(cluster["temp_dir"]) / "session_latest" / "logs"
    for p in logs_dir.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert SECRET.encode() not in data, p


def test_missing_bucket_is_a_clear_error(cluster, tmp_path, package):
    env = job_env(cluster)
    r = subprocess.run([sys.executable, "jobs/score.py", "--input", "s3://no-such-bucket/smears", "--output",
                        str(tmp_path / "out"), "--model", package], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    assert "bucket 'no-such-bucket' does not exist" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "jobs/score.py", "--input", str(tmp_path), "--output",
                        "s3://no-such-out-bucket/x", "--model", package], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "bucket 'no-such-out-bucket' does not exist" in r.stderr, r.stderr


def test_config_rejects_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("input: /x\nbatchsize: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'batchsize'"):
        load_config(ScoreConfig, p)
    cfg = load_config(ScoreConfig, REPO / "configs" / "score.yaml")
    assert cfg.review_threshold == 0.8 and cfg.storage.endpoint_url is None
    load_config(ScoreConfig, REPO / "configs" / "score-smoke.yaml")


@pytest.mark.parametrize("backend,precision,tta", [("onnx", "f32", "none"), ("openvino", "f32", "none"),
                                                   ("openvino", "bf16", "none"), ("onnx", "f32", "flips4"),
                                                   ("openvino", "bf16", "dihedral8")])
def test_cpu_backends_match_pytorch(package, tmp_path, backend, precision, tta):
    """The CPU actor's backends against the PyTorch model on the same decoded images (no Ray): f32 within 1e-4;
    guarded bf16 within the stated BF16_PROB_TOL and the same class (here the guard finds bf16 too coarse for this
    model, as it did for the trained Taleqani models, and scores in f32)."""
    import datetime as dt

    import torch

    from leukray.inference import BF16_PROB_TOL, resolve_cpu_precision
    from leukray.score import _Scorer

    bf16 = resolve_cpu_precision(precision) == "bf16"
    make_dataset(tmp_path / "d", per_class=6, size=48, seed=5)
    card = json.loads((Path(package) / registry.CARD).read_text()) | {"temperature": 1.0}
    card.pop("ood")  # another network: the tiny package's guard does not belong to it
    x = np.stack([decode_image(p.read_bytes(), card["preprocessing"]["image_size"])
                  for p in sorted((tmp_path / "d").rglob("*.jpg"))])
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    # The ImageNet backbone with its head fitted to these images (a linear probe, seconds): logits like a trained
    # model's, image to image. bf16's error grows with the logits; the guard must keep the answers within tolerance.
    labels = torch.tensor([i // 6 for i in range(len(x))])  # make_dataset: 6 per class, class folders in order
    model = _linear_probe(xt, labels, 100)
    from types import SimpleNamespace

    reference = package_outputs(SimpleNamespace(model=model, card={"classes": card["classes"]}), x, tta)
    expected = softmax_t(reference[:, :4], 1.0)
    confident = tmp_path / "confident"
    registry.write_package(str(confident), model, card)
    scorer = _Scorer(str(confident), None, "cpu", backend, 2, THRESHOLD, "r", dt.datetime.now(dt.timezone.utc),
                     precision, tta=tta)
    out = scorer.outputs(x).values  # with bf16 the first batch also measures bf16's error: all f32
    assert out.shape == (len(x), 4 + 1280 + STATS_DIM)
    np.testing.assert_allclose(softmax_t(out[:, :4], 1.0), expected, atol=PROB_TOL, rtol=0)
    # the guard's input: the pooled features of the same pass, averaged over the same views
    np.testing.assert_allclose(out[:, 4:], reference[:, 4:], atol=2e-4 * np.abs(reference[:, 4:]).max(), rtol=0)
    if bf16 and resolve_cpu_precision("auto") == "bf16":  # a CPU without native bf16 runs the hint in f32
        assert scorer.bf16.error > 0.01, scorer.bf16.error  # measured on the first batch
    got = softmax_t(scorer.outputs(x).values[:, :4], 1.0)
    np.testing.assert_allclose(got, expected, atol=BF16_PROB_TOL if bf16 else PROB_TOL, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).all()



@pytest.mark.parametrize("tta", ["none", "dihedral8"])
def test_torch_backend_matches_the_reference(package, tmp_path, tta):
    """The GPU scorer's path (here on the CPU): one upload, the views made by torch on the device, mean logits."""
    import datetime as dt

    from leukray.score import _Scorer

    pkg = registry.load_package(package)
    make_dataset(tmp_path / "d", per_class=2, size=48, seed=8)
    x = np.stack([decode_image(p.read_bytes(), pkg.image_size) for p in sorted((tmp_path / "d").rglob("*.jpg"))])
    scorer = _Scorer(package, None, "cpu", "torch", 1, THRESHOLD, "r", dt.datetime.now(dt.timezone.utc), tta=tta)
    got, expected = scorer.outputs(x).values, package_outputs(pkg, x, tta)
    np.testing.assert_allclose(got[:, :4], expected[:, :4], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[:, 4:], expected[:, 4:], atol=2e-4 * np.abs(expected[:, 4:]).max(), rtol=0)


@pytest.mark.parametrize("request_images", [1, 2, 5, 64])
def test_openvino_requests_put_every_image_back_in_place(package, tmp_path, request_images):
    """A batch cut into requests that run on parallel streams comes back in input order (odd sizes included)."""
    import torch

    from leukray.inference import OpenVINOModel

    pkg = registry.load_package(package)
    make_dataset(tmp_path / "d", per_class=2, size=48, seed=7)
    x = np.stack([decode_image(p.read_bytes(), pkg.image_size) for p in sorted((tmp_path / "d").rglob("*.jpg"))])[:7]
    with torch.inference_mode():
        expected = torch.cat(pkg.model.eval().forward_with_features(torch.from_numpy(x).permute(0, 3, 1, 2).float()),
                             1).numpy()
    model = OpenVINOModel((Path(package) / registry.ONNX).read_bytes(), 2, "f32", request_images)
    for n in (7, 1, 0):
        got = model(x[:n])
        assert got.shape == (n, 4 + 1280 + STATS_DIM)
        np.testing.assert_allclose(got[:, :4], expected[:n, :4], atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[:, 4:], expected[:n, 4:], atol=2e-4 * max(1.0, np.abs(expected).max()), rtol=0)


def test_bf16_guard_rescores_exactly_the_images_bf16_could_get_wrong():
    """The guard's rule on known logits (stand-in bf16/f32 predictors: the rule, not OpenVINO, is under test)."""
    import math

    from leukray.inference import BF16_ERROR_SAFETY, BF16_PROB_TOL, BF16Guard, Outputs

    f32 = np.array([[9.0, 0, 0, 0], [0, 9.0, 0, 0], [1.0, 0.9, 0, 0], [0, 0, 30.0, 0]] * 4, np.float32)
    bf16 = f32 + np.float32(0.1) * np.sign(np.arange(f32.size).reshape(f32.shape) % 2 - 0.5).astype(np.float32)
    calls = []

    def stand_in(table):
        def predict(x):
            rows = x[:, 0, 0, 0]
            if table is f32:
                calls.append(len(x))
            return Outputs(table[rows].copy(), np.ones(len(x), np.int64), np.ones(len(x)))
        return predict

    guard = BF16Guard(stand_in(bf16), stand_in(f32), 4)
    idx = np.arange(len(f32)).reshape(-1, 1, 1, 1).repeat(1, axis=3)
    first = guard(idx)  # first batch: f32 for all, error measured
    np.testing.assert_array_equal(first.values, f32)
    assert guard.error == pytest.approx(0.1, abs=1e-5) and guard.kept  # 3 of 4 sure: bf16 kept
    got = guard(idx).values
    need = 2 * BF16_ERROR_SAFETY * 0.1 + math.log(3 / BF16_PROB_TOL)  # 6.1: margins 9 and 30 are sure, 0.1 is not
    unsure = np.array([False, False, True, False] * 4)
    assert calls == [16, int(unsure.sum())] and need < 9
    np.testing.assert_array_equal(got[unsure], f32[unsure])
    np.testing.assert_array_equal(got[~unsure], bf16[~unsure])
    assert abs(softmax_t(got, 1.0) - softmax_t(f32, 1.0)).max() <= BF16_PROB_TOL


def test_bf16_falls_back_to_f32_when_too_coarse_for_the_model(package, tmp_path):
    """When bf16's error would leave most images unsure (here: the 1-epoch package, whose logits barely differ between classes), the
    first batch shows it and the run goes f32."""
    import datetime as dt

    import torch

    from leukray.inference import resolve_cpu_precision
    from leukray.score import _Scorer

    if resolve_cpu_precision("auto") != "bf16":
        pytest.skip("this CPU has no native bf16: OpenVINO runs f32 anyway")
    pkg = registry.load_package(package)
    card = json.loads((Path(package) / registry.CARD).read_text())
    card.pop("ood")
    registry.write_package(str(tmp_path / "flat"), pkg.model, card)
    make_dataset(tmp_path / "d", per_class=4, size=48, seed=6)
    x = np.stack([decode_image(p.read_bytes(), pkg.image_size) for p in sorted((tmp_path / "d").rglob("*.jpg"))])
    with torch.inference_mode():
        expected = pkg.model(torch.from_numpy(x).permute(0, 3, 1, 2).float()).numpy()
    scorer = _Scorer(str(tmp_path / "flat"), None, "cpu", "openvino", 2, THRESHOLD, "r",
                     dt.datetime.now(dt.timezone.utc), "bf16")
    for _ in range(2):
        np.testing.assert_allclose(scorer.outputs(x).values[:, :4], expected, atol=1e-4, rtol=0)
    assert scorer.bf16.error > 0 and not scorer.bf16.kept  # now f32 only


def test_bf16_needs_openvino():
    with pytest.raises(ValueError, match="cpu_precision=bf16 needs backend openvino"):
        ScoreConfig(input="/x", output="/y", model="/m", backend="onnx", cpu_precision="bf16")


def test_package_without_guard_scores_as_before(package, tmp_path):
    """A package fitted before the guard existed: rows get confidence-only review, the guard's columns stay null."""
    import datetime as dt

    from leukray.score import _Scorer
    from leukray.smoke import untrained_package

    old = untrained_package(str(tmp_path / "old"), 32)
    assert "ood" not in json.loads((Path(old) / registry.CARD).read_text())
    make_dataset(tmp_path / "d", per_class=2, size=40, seed=9)
    files = sorted((tmp_path / "d").rglob("*.jpg"))
    batch = pa.table({"path": [str(p) for p in files], "size": [p.stat().st_size for p in files],
                      "source_version": ["1"] * len(files)})
    rows = _Scorer(old, None, "cpu", "openvino", 1, THRESHOLD, "r", dt.datetime.now(dt.timezone.utc))(batch)
    assert rows.num_rows == len(files) and rows["status"].to_pylist() == ["ok"] * len(files)
    for col in ("ood_score", "in_distribution", "ood_check"):
        assert rows[col].null_count == len(files)
    low = rows["confidence"].to_numpy() < THRESHOLD
    assert rows["needs_review"].to_pylist() == low.tolist()
    assert rows["review_reason"].to_pylist() == ["low_confidence" if x else None for x in low]


def test_decode_layouts_give_the_same_rows_and_adaptive_rows_take_their_path(cluster, package, tiny_package, tmp_path):
    """decode=actor (each model actor decodes) and decode=tasks (CPU decode tasks, the actors only run the model)
    forced on this CPU cluster: the same rows, bad files as error rows in both. With tta adaptive each ok row
    records its views: 1 above the cascade threshold, 8 below, each with its path's calibrated probabilities."""
    from deltalake import DeltaTable

    from leukray.recalibrate import calibrate

    import torch

    calibrated = tmp_path / "calibrated"
    calibrate(package, str(tiny_package / "data"), str(calibrated), tta="adaptive")
    card = json.loads((calibrated / registry.CARD).read_text())
    card.pop("ood")  # another network below: the tiny package's guard does not belong to it
    archive = tmp_path / "archive"
    build_archive(archive)
    files = [p for p in _image_files(archive) if "bad" not in p.parts]
    x = np.stack([decode_image(p.read_bytes(), card["preprocessing"]["image_size"]) for p in files])
    # The ImageNet backbone with its head fitted to these images (a linear probe): confidences that differ from
    # image to image, as a trained model's do (the 1-epoch package's barely do).
    names = sorted({p.parent.name for p in files})
    labels = torch.tensor([names.index(p.parent.name) for p in files])
    model = _linear_probe(torch.from_numpy(x).permute(0, 3, 1, 2).float(), labels, 30)
    # two different temperatures, so a row calibrated with the other path's would show
    card["adaptive"]["temperature_one_view"], card["adaptive"]["temperature_full"] = 1.25, 0.8
    from types import SimpleNamespace

    one = package_predictions(SimpleNamespace(model=model, card=card), x, "none").confidence
    # a cascade threshold in the widest gap between the middle half of these images' one-view confidences: both
    # paths occur, and no backend's rounding moves an image across it
    c = np.sort(one)[len(x) // 4: 3 * len(x) // 4 + 1]
    gap = int(np.argmax(np.diff(c)))
    card["adaptive"]["threshold"] = float((c[gap] + c[gap + 1]) / 2)
    adaptive = tmp_path / "adaptive"
    registry.write_package(str(adaptive), model, card)
    pkg = registry.load_package(str(adaptive))
    rows = {}
    for layout in ("actor", "tasks"):
        cfg = {"input": str(archive), "output": str(tmp_path / f"out-{layout}"), "model": str(adaptive),
               "batch_size": 8, "decode_batch_size": 4, "files_per_block": 6, "review_threshold": THRESHOLD,
               "decode": layout, "tta": "adaptive"}
        (tmp_path / f"{layout}.yaml").write_text(yaml.safe_dump(cfg))
        res = submit_job(cluster, [sys.executable, "jobs/score.py", "--config", str(tmp_path / f"{layout}.yaml")],
                         working_dir=REPO, timeout=600)
        assert res.returncode == 0, res.stdout[-6000:]
        assert f"decode in {layout}" in res.stdout
        t = DeltaTable(cfg["output"]).to_pyarrow_table().sort_by("path")
        rows[layout] = t.drop_columns(["run_id", "scored_at"])
    assert rows["actor"].num_rows == len(_image_files(archive))
    assert rows["actor"].equals(rows["tasks"])
    t = rows["actor"]
    errors = t.filter(pc.equal(t["status"], "error"))
    assert errors.num_rows == len(BAD) and errors["views"].null_count == len(BAD)
    ok = t.filter(pc.equal(t["status"], "ok"))
    assert ok["path"].to_pylist() == [str(p) for p in files]
    want = check_rows_match_reference(ok, pkg, x)
    assert 0 < (want.views == 8).sum() < len(files)
    assert (want.views == np.where(one < card["adaptive"]["threshold"], 8, 1)).all()


def test_default_recipe_package_scores_adaptively_from_s3(cluster, recipe_package, tmp_path):
    """A package trained with the default recipe (configs/train.yaml: tta adaptive, the cascade fitted on val by
    training) published to an S3 registry, an S3 archive scored with `tta: package`: every ok row is the
    reference's cascade from the card — class, probabilities and confidence with its path's temperature, views —
    and some images take the one-view path, others the eight views."""
    pkg = registry.load_package(str(recipe_package))
    ad = pkg.card["adaptive"]
    assert pkg.card["tta"] == "adaptive" and ad["split"] == "val"
    endpoint = cluster["s3_endpoint"]
    for b in ("recipe-archive", "recipe-models", "recipe-scores"):
        make_bucket(endpoint, b)
    opts = StorageOptions(endpoint_url=endpoint, key=KEY, secret=SECRET)
    archive = tmp_path / "archive"
    build_archive(archive)
    storage.upload_dir(str(archive), "s3://recipe-archive/smears", opts)
    registry.publish(str(recipe_package), "s3://recipe-models", "leukray-recipe", opts)
    cfg = {"input": "s3://recipe-archive/smears", "output": "s3://recipe-scores/out",
           "model": "s3://recipe-models/leukray-recipe", "storage": {"endpoint_url": endpoint, "key": KEY, "secret": SECRET},
           "batch_size": 8, "decode_batch_size": 4, "files_per_block": 6, "review_threshold": THRESHOLD}
    (tmp_path / "score.yaml").write_text(yaml.safe_dump(cfg))
    res = submit_job(cluster, [sys.executable, "jobs/score.py", "--config", str(tmp_path / "score.yaml")],
                     working_dir=REPO, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    r = Results(cfg["output"], opts)
    m = r.runs[-1].raw
    assert m["execution"]["tta"] == "adaptive" and m["execution"]["cascade_threshold"] == ad["threshold"]
    t = r.dataset.to_table()
    assert t.filter(pc.equal(t["status"], "error")).num_rows == len(BAD)
    ok = t.filter(pc.equal(t["status"], "ok")).sort_by("path")
    files = {f"s3://recipe-archive/smears/{p.relative_to(archive).as_posix()}": p for p in _image_files(archive)}
    x = np.stack([decode_image(files[p].read_bytes(), pkg.image_size) for p in ok["path"].to_pylist()])
    # no image so near the threshold that a backend's rounding could move it to the other path
    one = package_predictions(pkg, x, "none").confidence
    assert np.abs(one - ad["threshold"]).min() > 1e-4
    want = check_rows_match_reference(ok, pkg, x)
    assert 0 < (want.views == 8).sum() < ok.num_rows
    assert set(want.temperature) == {ad["temperature_one_view"], ad["temperature_full"]}

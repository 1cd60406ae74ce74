"""leukray.query / leukray.query_cli over outputs written exactly per docs/architecture.md ("Scoring output").

The fixture writes several committed runs on three days (two runs on one day, two models, an empty run), error
rows, review rows, the orphan file of a crashed run (in results/, no manifest) and a staging file; neither of the
last two may be visible. Every report is checked against an independent computation with pyarrow.compute over
the fixture's ground truth, on a local folder and on s3:// served by a real moto server on 127.0.0.1.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import random
import socket
import urllib.request

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from leukray import CLASSES, storage
from leukray.config import StorageOptions
from leukray.query import RESULTS_SCHEMA, NoRunsError, QueryError, Results, prob_column
from leukray.query_cli import build_parser

MODEL = "leukray-mnv2"
BUCKET = "lab-scores"
# file schema: the documented columns without the hive partition column (writers drop it from the files)
FILE_SCHEMA = pa.schema([f for f in RESULTS_SCHEMA if f.name != "run_date"])
TRAIN_COUNTS = {
    "v0001": {"Benign": 500, "Early Pre-B": 985, "Pre-B": 963, "Pro-B": 804},
    "v0002": {"Benign": 400, "Early Pre-B": 1000, "Pre-B": 900, "Pro-B": 900},
}
ERRORS = ["empty file", "truncated image", "not an image (unrecognised format)", "too large: 60000x60000 pixels"]

# (run_id, run_date, model_version, model reference kind, rows per file)
RUNS = [
    ("20261125T031500Z-aaaaaa", "2026-11-25", "v0001", "model", [40, 25]),
    ("20261126T031500Z-bbbbbb", "2026-11-26", "v0001", "model", [30]),
    ("20261126T150000Z-cccccc", "2026-11-26", "v0001", "model", [15, 20]),
    ("20261127T031500Z-dddddd", "2026-11-27", "v0002", "package", [45]),
    ("20261128T031500Z-ffffff", "2026-11-28", "v0002", "package", []),  # nothing new to score
]
ORPHAN_RUN = "20261127T120000Z-eeeeee"  # crashed before writing its manifest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(rng: random.Random, run_id: str, run_date: str, version: str, n: int, file_no: int) -> list[dict]:
    # day-dependent class mix so that drift differs per day; seeded → deterministic
    weights = {"2026-11-25": [1, 2, 2, 2], "2026-11-26": [1, 1, 1, 1], "2026-11-27": [5, 1, 1, 1]}.get(
        run_date, [1, 1, 1, 1])
    scored = dt.datetime.strptime(run_id[:15], "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc) + dt.timedelta(
        minutes=5)
    rows = []
    for i in range(n):
        path = f"s3://lab-images/{run_date}/{run_id[-6:]}-{file_no}-{i:03d}.jpg"
        base = {"path": path, "size": rng.randint(1, 90000), "source_version": f'"{rng.getrandbits(64):016x}"',
                "model_name": MODEL, "model_version": version, "run_id": run_id,
                "scored_at": scored + dt.timedelta(seconds=i)}
        if rng.random() < 0.12:
            base.update(status="error", error=rng.choice(ERRORS), predicted_class=None, confidence=None,
                        needs_review=None, **{prob_column(c): None for c in CLASSES})
            if i == 0:
                base["size"] = 0
        else:
            cls = rng.choices(CLASSES, weights=weights)[0]
            conf = rng.uniform(0.3, 0.999)
            rest = [rng.random() for _ in range(3)]
            others = [c for c in CLASSES if c != cls]
            probs = {prob_column(cls): conf}
            probs.update({prob_column(c): (1 - conf) * r / sum(rest) for c, r in zip(others, rest)})
            base.update(status="ok", error=None, predicted_class=cls, confidence=conf,
                        needs_review=conf < 0.6, **probs)
        rows.append(base)
    return rows


def _write_parquet(path: str, rows: list[dict], schema: pa.Schema = FILE_SCHEMA) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def build_outputs(root: str, output_uri: str, registry_uri: str) -> pa.Table:
    """Write the scoring outputs + registry under the local folder `root` (to be uploaded as is for s3) and
    return the ground truth: every committed row with its run_date."""
    rng = random.Random(20261127)
    out = os.path.join(root, "score")
    truth: list[dict] = []
    for run_id, run_date, version, ref, sizes in RUNS:
        files = []
        for n_file, n in enumerate(sizes):
            rel = f"results/run_date={run_date}/{run_id}-{n_file}.parquet"
            rows = _rows(rng, run_id, run_date, version, n, n_file)
            if run_id.endswith("bbbbbb"):  # a writer that keeps the partition column inside the file too
                _write_parquet(os.path.join(out, rel), [dict(r, run_date=run_date) for r in rows], RESULTS_SCHEMA)
            else:
                _write_parquet(os.path.join(out, rel), rows)
            files.append(rel)
            truth += [dict(r, run_date=run_date) for r in rows]
        model_uri = f"{registry_uri}/{MODEL}" + (f"/{version}" if ref == "package" else "")
        manifest = {"run_id": run_id, "run_date": run_date, "model_uri": model_uri, "model_name": MODEL,
                    "model_version": version, "files": files, "rows": sum(sizes), "status": "committed"}
        os.makedirs(os.path.join(out, "_runs"), exist_ok=True)
        with open(os.path.join(out, "_runs", f"{run_id}.json"), "w") as f:
            json.dump(manifest, f)
    # the crashed run: a data file in results/ (not in any manifest) and one still in staging
    orphan = _rows(rng, ORPHAN_RUN, "2026-11-27", "v0002", 12, 0)
    _write_parquet(os.path.join(out, f"results/run_date=2026-11-27/{ORPHAN_RUN}-0.parquet"), orphan)
    _write_parquet(os.path.join(out, f"_staging/{ORPHAN_RUN}/{ORPHAN_RUN}-1.parquet"), orphan)
    # the registry: model folder with LATEST, two packages
    reg = os.path.join(root, "registry", MODEL)
    for version, counts in TRAIN_COUNTS.items():
        os.makedirs(os.path.join(reg, version), exist_ok=True)
        with open(os.path.join(reg, version, "model_card.json"), "w") as f:
            json.dump({"name": MODEL, "version": version, "classes": list(CLASSES), "class_counts": counts}, f)
    with open(os.path.join(reg, "LATEST"), "w") as f:
        f.write("v0002\n")
    return pa.Table.from_pylist(truth, schema=RESULTS_SCHEMA)


@pytest.fixture(scope="module")
def moto_server():
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


def _reset_and_bucket(endpoint: str) -> None:
    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).read()
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)


class Loc:
    """Where the test outputs are: output prefix, registry prefix, storage options, ground truth."""

    def __init__(self, kind: str, output: str, registry: str, opts: StorageOptions | None, truth: pa.Table,
                 endpoint: str | None = None):
        self.kind, self.output, self.registry, self.opts, self.truth = kind, output, registry, opts, truth
        self.endpoint = endpoint

    def results(self) -> Results:
        return Results(self.output, self.opts)

    def cli(self, *argv: str) -> tuple[int, str, str]:
        extra = ["--output", self.output] + (["--endpoint-url", self.endpoint] if self.endpoint else [])
        args = build_parser().parse_args(list(argv) + extra)
        out, err = io.StringIO(), io.StringIO()
        rc = args.func(args, out=out, err=err)
        return rc, out.getvalue(), err.getvalue()


@pytest.fixture(params=["local", "s3"])
def loc(request, tmp_path) -> Loc:
    if request.param == "local":
        truth = build_outputs(str(tmp_path), str(tmp_path / "score"), str(tmp_path / "registry"))
        return Loc("local", str(tmp_path / "score"), str(tmp_path / "registry"), None, truth)
    endpoint = request.getfixturevalue("moto_server")
    _reset_and_bucket(endpoint)
    opts = StorageOptions(endpoint_url=endpoint)
    output, registry = f"s3://{BUCKET}/nightly/score", f"s3://{BUCKET}/registry"
    truth = build_outputs(str(tmp_path), output, registry)
    storage.upload_dir(str(tmp_path / "score"), output, opts)
    storage.upload_dir(str(tmp_path / "registry"), registry, opts)
    return Loc("s3", output, registry, opts, truth, endpoint)


# ---------------------------------------------------------------------------------------------------------------
# independent expectations (pyarrow.compute only)


def _window(t: pa.Table, since: str | None = None, until: str | None = None) -> pa.Table:
    mask = pa.array([True] * t.num_rows)
    if since:
        mask = pc.and_(mask, pc.greater_equal(t["run_date"], since))
    if until:
        mask = pc.and_(mask, pc.less_equal(t["run_date"], until))
    return t.filter(mask)


def _expected_summary(t: pa.Table, key: str) -> dict[str, dict]:
    out = {}
    for k in pc.unique(t[key]).to_pylist():
        g = t.filter(pc.equal(t[key], k))
        ok = g.filter(pc.equal(g["status"], "ok"))
        row = {"files": g.num_rows, "ok": ok.num_rows, "errors": g.num_rows - ok.num_rows,
               "needs_review": pc.sum(pc.cast(pc.fill_null(g["needs_review"], False), pa.int64())).as_py() or 0,
               "mean_confidence": pc.mean(ok["confidence"]).as_py()}
        for c in CLASSES:
            row[c] = pc.sum(pc.cast(pc.equal(ok["predicted_class"], c), pa.int64())).as_py() or 0
        out[k] = row
    return out


def _check_rows_match(got: list[dict], expected: dict[str, dict], key: str) -> None:
    assert [r[key] for r in got] == sorted(expected, key=lambda k: k)
    for r in got:
        exp = expected[r[key]]
        for name, value in exp.items():
            if isinstance(value, float):
                assert r[name] == pytest.approx(value, rel=1e-12), (r[key], name)
            else:
                assert r[name] == value, (r[key], name)


# ---------------------------------------------------------------------------------------------------------------
# the results view


def test_results_view_has_only_committed_rows(loc):
    r = loc.results()
    t = r.sql("SELECT * FROM results")
    assert t.num_rows == loc.truth.num_rows
    assert t.schema.field("run_date").type == pa.string()
    assert t.schema.field("scored_at").type == pa.timestamp("us", tz=t.schema.field("scored_at").type.tz)
    run_ids = set(t["run_id"].to_pylist())
    assert ORPHAN_RUN not in run_ids
    assert run_ids == {run for run, *_rest, sizes in RUNS if sizes}
    # same rows, same values (order-independent) as the ground truth
    key = ["path", "run_id"]
    got = t.select(RESULTS_SCHEMA.names).sort_by([(k, "ascending") for k in key])
    exp = loc.truth.sort_by([(k, "ascending") for k in key])
    for name in RESULTS_SCHEMA.names:
        if name == "scored_at":
            assert pc.all(pc.equal(pc.cast(got[name], pa.int64()), pc.cast(exp[name], pa.int64()))).as_py()
        else:
            assert got[name].to_pylist() == exp[name].to_pylist(), name
    # the partition column comes from the path, also for the file that also stores it
    per_day = r.sql("SELECT run_date, count(*) AS n FROM results GROUP BY run_date ORDER BY run_date").to_pylist()
    exp_days = loc.truth.group_by("run_date").aggregate([("path", "count")]).sort_by("run_date").to_pylist()
    assert [(d["run_date"], d["n"]) for d in per_day] == [(d["run_date"], d["path_count"]) for d in exp_days]
    assert [run.run_id for run in r.runs] == [run[0] for run in RUNS]
    assert r.runs[-1].files == [] and r.runs[-1].run_date == "2026-11-28"


def test_sql_parameters_and_pandas(loc):
    r = loc.results()
    t = r.sql("SELECT count(*) AS n FROM results WHERE run_date = ? AND status = ?", ["2026-11-26", "error"])
    day = loc.truth.filter(pc.and_(pc.equal(loc.truth["run_date"], "2026-11-26"),
                                   pc.equal(loc.truth["status"], "error")))
    assert t.to_pylist() == [{"n": day.num_rows}]
    df = r.to_pandas("SELECT path FROM results ORDER BY path LIMIT 3")
    assert list(df.columns) == ["path"] and len(df) == 3
    assert len(r.to_pandas(r.errors())) == r.errors().num_rows


def _put_outside_fsspec(loc: Loc, rel: str, data: bytes) -> None:
    """Write as another process would (boto3 / plain open), so no fsspec listing cache knows about it."""
    if loc.kind == "s3":
        import boto3

        bucket, prefix = loc.output[len("s3://"):].split("/", 1)
        boto3.client("s3", endpoint_url=loc.endpoint, region_name="us-east-1").put_object(
            Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)
    else:
        with open(os.path.join(loc.output, rel), "wb") as f:
            f.write(data)


def test_new_commit_visible_after_refresh(loc, tmp_path):
    r = loc.results()
    before = r.sql("SELECT count(*) AS n FROM results").to_pylist()[0]["n"]
    # the crashed run is re-run and commits its (formerly orphan) file
    manifest = {"run_id": ORPHAN_RUN, "model_uri": f"{loc.registry}/{MODEL}", "model_version": "v0002",
                "files": [f"results/run_date=2026-11-27/{ORPHAN_RUN}-0.parquet"]}
    _put_outside_fsspec(loc, f"_runs/{ORPHAN_RUN}.json", json.dumps(manifest).encode())
    assert r.sql("SELECT count(*) AS n FROM results").to_pylist()[0]["n"] == before  # cached
    assert loc.results().sql("SELECT count(*) AS n FROM results").to_pylist()[0]["n"] == before + 12  # new handle
    r.refresh()
    assert r.sql("SELECT count(*) AS n FROM results").to_pylist()[0]["n"] == before + 12
    assert r.sql(f"SELECT DISTINCT run_date FROM results WHERE run_id = '{ORPHAN_RUN}'").to_pylist() == [
        {"run_date": "2026-11-27"}]


# ---------------------------------------------------------------------------------------------------------------
# reports


@pytest.mark.parametrize("since,until", [(None, None), ("2026-11-26", None), (None, "2026-11-26"),
                                         ("2026-11-26", "2026-11-26")])
def test_summary_per_run_and_per_day(loc, since, until):
    r = loc.results()
    t = _window(loc.truth, since, until)
    by_run = r.summary(since, until).to_pylist()
    expected = _expected_summary(t, "run_id")
    # the committed run without rows appears with zero counts when its day is in the window
    empty_run, empty_day = RUNS[-1][0], RUNS[-1][1]
    empty_in = (since is None or empty_day >= since) and (until is None or empty_day <= until)
    if empty_in:
        row = next(x for x in by_run if x["run_id"] == empty_run)
        assert row["files"] == 0 and row["ok"] == 0 and row["mean_confidence"] is None
        assert row["run_date"] == empty_day
        by_run = [x for x in by_run if x["run_id"] != empty_run]
    else:
        assert empty_run not in [x["run_id"] for x in by_run]
    _check_rows_match(by_run, expected, "run_id")
    for x in by_run:
        assert x["run_date"] == next(d for run, d, *_ in RUNS if run == x["run_id"])
        assert x["model"] == f"{MODEL}:" + next(v for run, _d, v, *_ in RUNS if run == x["run_id"])

    by_day = r.summary(since, until, by="day").to_pylist()
    _check_rows_match(by_day, _expected_summary(t, "run_date"), "run_date")
    for x in by_day:
        assert x["runs"] == len(pc.unique(t.filter(pc.equal(t["run_date"], x["run_date"]))["run_id"]))


def test_review_queue(loc):
    r = loc.results()
    t = loc.truth
    flagged = t.filter(pc.and_(pc.fill_null(t["needs_review"], False), pc.equal(t["status"], "ok")))
    flagged = flagged.sort_by([("confidence", "ascending"), ("path", "ascending")])
    assert flagged.num_rows > 10
    full = r.review(limit=None)
    assert full["path"].to_pylist() == flagged["path"].to_pylist()
    assert full["confidence"].to_pylist() == flagged["confidence"].to_pylist()
    assert all(c < 0.6 for c in full["confidence"].to_pylist())
    assert {"path", "confidence", "predicted_class", "run_date", "run_id"} <= set(full.schema.names)
    top = r.review(limit=5)
    assert top["path"].to_pylist() == flagged["path"].to_pylist()[:5]
    day = _window(flagged, "2026-11-27", "2026-11-27")
    assert r.review("2026-11-27", "2026-11-27", limit=None)["path"].to_pylist() == day["path"].to_pylist()
    capped = r.review(limit=None, max_confidence=0.45)
    assert capped["path"].to_pylist() == flagged.filter(pc.less_equal(flagged["confidence"], 0.45))["path"].to_pylist()


@pytest.mark.parametrize("since,until", [(None, None), ("2026-11-27", None)])
def test_errors_grouped(loc, since, until):
    r = loc.results()
    t = _window(loc.truth, since, until)
    failed = t.filter(pc.equal(t["status"], "error"))
    got = r.errors(since, until, examples=2).to_pylist()
    expected = {}
    for msg in pc.unique(failed["error"]).to_pylist():
        g = failed.filter(pc.equal(failed["error"], msg))
        paths = sorted(set(g["path"].to_pylist()))
        expected[msg] = {"count": g.num_rows, "example_paths": paths[:2],
                         "runs": len(pc.unique(g["run_id"])),
                         "first_run_date": pc.min(g["run_date"]).as_py(),
                         "last_run_date": pc.max(g["run_date"]).as_py()}
    assert {x["error"] for x in got} == set(expected)
    counts = [x["count"] for x in got]
    assert counts == sorted(counts, reverse=True)
    for x in got:
        for k, v in expected[x["error"]].items():
            assert x[k] == v, (x["error"], k)
    assert sum(counts) == failed.num_rows


def _training_props(version: str) -> dict[str, float]:
    counts = TRAIN_COUNTS[version]
    total = sum(counts.values())
    return {c: counts[c] / total for c in CLASSES}


def _expected_drift(t: pa.Table) -> dict[tuple[str, str], dict]:
    from scipy.stats import chisquare

    ok = t.filter(pc.equal(t["status"], "ok"))
    out = {}
    for day in pc.unique(ok["run_date"]).to_pylist():
        g = ok.filter(pc.equal(ok["run_date"], day))
        for version in pc.unique(g["model_version"]).to_pylist():
            gv = g.filter(pc.equal(g["model_version"], version))
            counts = [pc.sum(pc.cast(pc.equal(gv["predicted_class"], c), pa.int64())).as_py() or 0 for c in CLASSES]
            n = sum(counts)
            q = _training_props(version)
            stat, p = chisquare(counts, [n * q[c] for c in CLASSES])
            props = {c: k / n for c, k in zip(CLASSES, counts)}
            out[(day, f"{MODEL}:{version}")] = {
                "n": n, **props, "tv_distance": 0.5 * sum(abs(props[c] - q[c]) for c in CLASSES),
                "chi2": float(stat), "p_value": float(p)}
    return out


def test_drift_against_model_cards(loc, tmp_path):
    r = loc.results()
    table = r.drift(plot=str(tmp_path / "plots" / "mix.png"))
    rows = table.to_pylist()
    assert table.schema.names[:4] == ["source", "run_date", "model", "n"]
    assert [c for c in table.schema.names[4:8]] == list(CLASSES)
    training = [x for x in rows if x["source"] == "training"]
    assert [x["model"] for x in training] == [f"{MODEL}:v0001", f"{MODEL}:v0002"]
    for x in training:
        version = x["model"].split(":")[1]
        assert x["n"] == sum(TRAIN_COUNTS[version].values())
        for c, q in _training_props(version).items():
            assert x[c] == pytest.approx(q)
    scored = [x for x in rows if x["source"] == "scored"]
    expected = _expected_drift(loc.truth)
    assert [(x["run_date"], x["model"]) for x in scored] == sorted(expected)
    for x in scored:
        exp = expected[(x["run_date"], x["model"])]
        for k, v in exp.items():
            assert x[k] == pytest.approx(v, rel=1e-9), (x["run_date"], k)
        assert sum(x[c] for c in CLASSES) == pytest.approx(1.0)
    # day 3 was generated with a strongly shifted mix
    d3 = next(x for x in scored if x["run_date"] == "2026-11-27")
    assert d3["tv_distance"] > 0.2 and d3["p_value"] < 0.01
    png = (tmp_path / "plots" / "mix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_drift_with_explicit_model_and_window(loc):
    r = loc.results()
    # a model folder: resolved through LATEST (v0002) and used for every day
    rows = r.drift(since="2026-11-26", model=f"{loc.registry}/{MODEL}").to_pylist()
    assert [x["source"] for x in rows] == ["training", "scored", "scored"]
    assert rows[0]["model"] == f"{MODEL}:v0002"
    t = _window(loc.truth, "2026-11-26")
    ok = t.filter(pc.equal(t["status"], "ok"))
    q = _training_props("v0002")
    for x in rows[1:]:
        g = ok.filter(pc.equal(ok["run_date"], x["run_date"]))
        assert x["n"] == g.num_rows
        props = {c: (pc.sum(pc.cast(pc.equal(g["predicted_class"], c), pa.int64())).as_py() or 0) / g.num_rows
                 for c in CLASSES}
        assert x["tv_distance"] == pytest.approx(0.5 * sum(abs(props[c] - q[c]) for c in CLASSES))
    # a package folder
    pkg = r.drift(until="2026-11-25", model=f"{loc.registry}/{MODEL}/v0001").to_pylist()
    assert [x["model"] for x in pkg] == [f"{MODEL}:v0001"] * 2


def test_drift_missing_model_card_is_clear(loc):
    with pytest.raises(QueryError, match="no model card found for .*nowhere"):
        loc.results().drift(model=f"{loc.registry}/nowhere")


# ---------------------------------------------------------------------------------------------------------------
# clear errors


def test_no_runs(loc):
    empty = storage.join(loc.output.rsplit("/", 1)[0], "empty-prefix")
    with pytest.raises(NoRunsError) as err:
        Results(empty, loc.opts).sql("SELECT 1")
    expected = storage.join(empty, "_runs", "*.json")
    assert str(err.value) == f"no scoring runs found under {empty} (expected {expected})"
    rc, out, msg = Loc(loc.kind, empty, loc.registry, loc.opts, loc.truth, loc.endpoint).cli("report", "summary")
    assert rc == 2 and out == "" and "no scoring runs found under" in msg


def test_missing_bucket(moto_server):
    _reset_and_bucket(moto_server)
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        Results("s3://no-such-bucket/score", StorageOptions(endpoint_url=moto_server)).summary()
    args = build_parser().parse_args(["query", "SELECT 1", "--output", "s3://no-such-bucket/score",
                                      "--endpoint-url", moto_server])
    err = io.StringIO()
    assert args.func(args, out=io.StringIO(), err=err) == 2
    assert "bucket 'no-such-bucket' does not exist" in err.getvalue()


def test_bad_sql_and_unknown_column(loc):
    r = loc.results()
    with pytest.raises(QueryError) as err:
        r.sql("SELEC path FROM results")
    msg = str(err.value)
    assert msg.startswith("malformed SQL in query over " + loc.output)
    assert "SQL: SELEC path FROM results" in msg
    with pytest.raises(QueryError) as err:
        r.sql("SELECT confidnce FROM results")
    msg = str(err.value)
    assert "unknown column" in msg and "confidnce" in msg and loc.output in msg
    assert "SQL: SELECT confidnce FROM results" in msg and "columns of 'results': path, size" in msg
    with pytest.raises(QueryError, match="unknown table"):
        r.sql("SELECT * FROM resultz")
    with pytest.raises(QueryError, match="since must be a date YYYY-MM-DD"):
        r.summary(since="27/11/2026")
    rc, out, msg = loc.cli("query", "SELECT nope FROM results")
    assert rc == 2 and out == "" and msg.startswith("error: unknown column") and "SELECT nope FROM results" in msg


def test_manifest_listing_missing_file(loc):
    manifest = {"run_id": "20261129T031500Z-gggggg", "files": ["results/run_date=2026-11-29/gone-0.parquet"]}
    storage.write_json(storage.join(loc.output, "_runs", "20261129T031500Z-gggggg.json"), manifest, loc.opts)
    with pytest.raises(QueryError, match=r"committed data files are missing .*gone-0.parquet \(listed by .*gggggg.json\)"):
        loc.results().sql("SELECT count(*) FROM results")


def test_malformed_manifest(loc):
    storage.write_bytes(storage.join(loc.output, "_runs", "broken.json"), b"{not json", loc.opts)
    with pytest.raises(QueryError, match=r"run manifest .*broken.json is not valid JSON"):
        loc.results().summary()


# ---------------------------------------------------------------------------------------------------------------
# CLI (argparse wiring, every format)


def test_cli_query_formats(loc):
    sql = "SELECT run_date, count(*) AS n, avg(confidence) AS c FROM results GROUP BY 1 ORDER BY 1"
    exp = loc.results().sql(sql).to_pylist()
    rc, out, err = loc.cli("query", sql, "--format", "json")
    assert rc == 0, err
    got = json.loads(out)
    assert [x["run_date"] for x in got] == [x["run_date"] for x in exp]
    assert [x["n"] for x in got] == [x["n"] for x in exp]
    assert [x["c"] for x in got] == pytest.approx([x["c"] for x in exp])

    rc, out, _ = loc.cli("query", sql, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(x["run_date"], int(x["n"])) for x in rows] == [(x["run_date"], x["n"]) for x in exp]
    assert [float(x["c"]) for x in rows] == pytest.approx([x["c"] for x in exp], rel=1e-12)

    rc, out, _ = loc.cli("query", sql)  # default: aligned table
    lines = out.splitlines()
    assert lines[0].split() == ["run_date", "n", "c"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[-1] == f"({len(exp)} rows)"
    widths = {len(line) for line in lines[2:-1]}
    assert len(widths) == 1  # right-aligned numbers → equal line lengths
    assert lines[2].split()[0] == exp[0]["run_date"] and int(lines[2].split()[1]) == exp[0]["n"]


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_cli_reports(loc, fmt, tmp_path):
    r = loc.results()
    cases = {
        ("summary",): r.summary(),
        ("summary", "--by", "day", "--since", "2026-11-26"): r.summary("2026-11-26", by="day"),
        ("review", "--limit", "7"): r.review(limit=7),
        ("errors", "--until", "2026-11-26"): r.errors(until="2026-11-26"),
        ("drift",): r.drift(),
    }
    for argv, exp in cases.items():
        rc, out, err = loc.cli("report", *argv, "--format", fmt)
        assert rc == 0, (argv, err)
        if fmt == "json":
            got = json.loads(out)
            assert len(got) == exp.num_rows and list(got[0]) == exp.schema.names, argv
            first = exp.slice(0, 1).to_pylist()[0]
            for k, v in first.items():
                if isinstance(v, float):
                    assert got[0][k] == pytest.approx(v), (argv, k)
                elif isinstance(v, dt.datetime):
                    assert dt.datetime.fromisoformat(got[0][k]) == v
                else:
                    assert got[0][k] == v, (argv, k)
        elif fmt == "csv":
            rows = list(csv.reader(io.StringIO(out)))
            assert rows[0] == exp.schema.names and len(rows) == exp.num_rows + 1, argv
            if argv[0] == "errors":
                assert rows[1][exp.schema.names.index("example_paths")] == "; ".join(
                    exp["example_paths"][0].as_py())
        else:
            lines = out.splitlines()
            assert lines[0].split()[0] == exp.schema.names[0] and lines[-1].startswith(f"({exp.num_rows} row"), argv
    png = tmp_path / "drift.png"
    rc, _, err = loc.cli("report", "drift", "--plot", str(png), "--format", fmt)
    assert rc == 0, err
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_output_default_from_env(loc, monkeypatch):
    monkeypatch.setenv("LEUKRAY_OUTPUT", loc.output)
    argv = ["query", "SELECT count(*) AS n FROM results", "--format", "json"]
    if loc.endpoint:
        argv += ["--endpoint-url", loc.endpoint]
    args = build_parser().parse_args(argv)
    out = io.StringIO()
    assert args.func(args, out=out, err=io.StringIO()) == 0
    assert json.loads(out.getvalue()) == [{"n": loc.truth.num_rows}]


def test_json_has_no_nan(loc):
    """JSON output is strict JSON: inf chi2 (a class unseen in training) and NaN become null."""
    from leukray.query import write_table

    t = pa.table({"a": [math.inf, math.nan, 1.5], "b": ["x", None, "z"]})
    out = io.StringIO()
    write_table(t, "json", out)
    assert json.loads(out.getvalue()) == [{"a": None, "b": "x"}, {"a": None, "b": None}, {"a": 1.5, "b": "z"}]


def test_only_empty_runs(tmp_path):
    """Committed runs that found nothing to score: an empty view, zero rows in the per-run summary."""
    runs = tmp_path / "score" / "_runs"
    runs.mkdir(parents=True)
    (runs / "20261128T031500Z-ffffff.json").write_text(json.dumps({"run_id": "20261128T031500Z-ffffff", "files": []}))
    r = Results(str(tmp_path / "score"))
    assert r.sql("SELECT count(*) AS n FROM results").to_pylist() == [{"n": 0}]
    (row,) = r.summary().to_pylist()
    assert row["run_id"] == "20261128T031500Z-ffffff" and row["run_date"] == "2026-11-28" and row["files"] == 0
    assert r.summary(by="day").num_rows == r.review().num_rows == r.errors().num_rows == 0
    assert r.drift().num_rows == 0

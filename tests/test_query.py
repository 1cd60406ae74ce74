"""leukray.query / leukray.query_cli over results tables written exactly per docs/architecture.md ("Scoring output").

The fixture writes a Delta table the way scoring runs do (leukray.results: data files, then one commit per run
carrying its record): several runs on three days (two runs on one day, two models, an empty run), error rows,
review rows, and the data file of a crashed run that never committed it, which may not be visible. Every report is
checked against an independent computation with pyarrow.compute over the fixture's ground truth, on a local folder
and on s3:// served by a real moto server on 127.0.0.1; also time travel (--as-of) and the conversion of an output
in the previous layout (results/ + _runs/, as the previous scorer wrote it).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from leukray import CLASSES, results, storage
from leukray.config import StorageOptions
from leukray.query import RESULTS_SCHEMA, LegacyLayoutError, NoRunsError, QueryError, Results, prob_column
from leukray.query_cli import build_parser

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-score"
"""An output in the previous layout written by the previous scorer (3 runs: 13 rows with an error row, 1 row, none)."""

MODEL = "leukray-mnv2"
BUCKET = "lab-scores"
# file schema: the documented columns without the hive partition column (writers drop it from the files)
FILE_SCHEMA = pa.schema([f for f in RESULTS_SCHEMA if f.name != "run_date"])
TRAIN_COUNTS = {
    "v0001": {"Benign": 500, "Early Pre-B": 985, "Pre-B": 963, "Pro-B": 804},
    "v0002": {"Benign": 400, "Early Pre-B": 1000, "Pre-B": 900, "Pro-B": 900},
}
SCORE_MEDIAN = {"all": 0.35, "by_class": [0.2, 0.35, None, 0.45], "n_val": 277}
"""v0002's validation medians (`leukray.ood.score_medians`): Pre-B takes the overall one."""
ERRORS = ["empty file", "truncated image", "not an image (unrecognised format)", "too large: 60000x60000 pixels"]

# (run_id, run_date, model_version, model reference kind, rows per file)
RUNS = [
    ("20261125T031500Z-aaaaaa", "2026-11-25", "v0001", "model", [40, 25]),
    ("20261126T031500Z-bbbbbb", "2026-11-26", "v0001", "model", [30]),
    ("20261126T150000Z-cccccc", "2026-11-26", "v0001", "model", [15, 20]),
    ("20261127T031500Z-dddddd", "2026-11-27", "v0002", "package", [45]),
    ("20261128T031500Z-ffffff", "2026-11-28", "v0002", "package", []),  # nothing new to score
]
ORPHAN_RUN = "20261127T120000Z-eeeeee"  # crashed before committing its data file


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
                        needs_review=None, ood_score=None, in_distribution=None, review_reason=None, ood_check=None,
                        **{prob_column(c): None for c in CLASSES})
            if i == 0:
                base["size"] = 0
        else:
            cls = rng.choices(CLASSES, weights=weights)[0]
            conf = rng.uniform(0.3, 0.999)
            rest = [rng.random() for _ in range(3)]
            others = [c for c in CLASSES if c != cls]
            probs = {prob_column(cls): conf}
            probs.update({prob_column(c): (1 - conf) * r / sum(rest) for c, r in zip(others, rest)})
            # v0001 is a package from before the out-of-distribution guard: its columns stay null
            ood_score = None if version == "v0001" else rng.uniform(0.1, 0.6)
            ood = ood_score is not None and ood_score > 0.5
            reason = {(True, False): "low_confidence", (False, True): "out_of_distribution",
                      (True, True): "low_confidence,out_of_distribution"}.get((conf < 0.6, ood))
            base.update(status="ok", error=None, predicted_class=cls, confidence=conf,
                        needs_review=conf < 0.6 or ood, ood_score=ood_score,
                        in_distribution=None if ood_score is None else not ood, review_reason=reason,
                        ood_check=("knn,structure" if ood_score > 0.58 else "knn") if ood else None, **probs)
        rows.append(base)
    return rows


def _write_run(out: str, run_id: str, run_date: str, tables: list[pa.Table], record: dict | None,
               opts: StorageOptions | None = None) -> pa.Table:
    """What a scoring run does: workers write data files (results.write_files), then one commit; without `record`
    the files are written and never committed (a run that died). Returns the files' metadata."""
    files = [results.write_files(t, out, opts, run_id, run_date) for t in tables]
    files = pa.concat_tables(files) if files else results.ACTION_SCHEMA.empty_table()
    if record is not None:
        results.Committer(out, opts, run_id, record.get("model_name") or "", record.get("model_version") or "",
                          None).commit(files, record)
        time.sleep(0.01)  # distinct commit timestamps (time travel by time)
    return files


def build_outputs(root: str, output_uri: str, registry_uri: str) -> pa.Table:
    """Write the results table + registry under the local folder `root` (to be uploaded as is for s3) and return
    the ground truth: every committed row with its run_date."""
    rng = random.Random(20261127)
    out = os.path.join(root, "score")
    truth: list[dict] = []
    for run_id, run_date, version, ref, sizes in RUNS:
        tables = []
        for n_file, n in enumerate(sizes):
            rows = _rows(rng, run_id, run_date, version, n, n_file)
            tables.append(pa.Table.from_pylist(rows, schema=FILE_SCHEMA))
            truth += [dict(r, run_date=run_date) for r in rows]
        model_uri = f"{registry_uri}/{MODEL}" + (f"/{version}" if ref == "package" else "")
        record = {"run_id": run_id, "run_date": run_date, "model_uri": model_uri, "model_name": MODEL,
                  "model_version": version, "rows": sum(sizes), "status": "committed"}
        _write_run(out, run_id, run_date, tables, record)
    # the crashed run: a data file in the table's folder that no commit references
    orphan = _rows(rng, ORPHAN_RUN, "2026-11-27", "v0002", 12, 0)
    _write_run(out, ORPHAN_RUN, "2026-11-27", [pa.Table.from_pylist(orphan, schema=FILE_SCHEMA)], None)
    # the registry: model folder with LATEST, two packages
    reg = os.path.join(root, "registry", MODEL)
    for version, counts in TRAIN_COUNTS.items():
        os.makedirs(os.path.join(reg, version), exist_ok=True)
        with open(os.path.join(reg, version, "model_card.json"), "w") as f:
            card = {"name": MODEL, "version": version, "classes": list(CLASSES), "class_counts": counts}
            if version != "v0001":  # v0001: a package from before the guard
                card["ood"] = {"method": "knn", "in_fraction": 0.97, "val_flagged_fraction": 0.03,
                               "score_median": SCORE_MEDIAN}
            json.dump(card, f)
    with open(os.path.join(reg, "LATEST"), "w") as f:
        f.write("v0002\n")
    return pa.Table.from_pylist(truth, schema=RESULTS_SCHEMA)


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory):
    """A moto S3 server in its own process on 127.0.0.1 (deltalake's calls hold the GIL while they wait for S3:
    a server thread in this process could never answer them)."""
    import signal
    import subprocess
    import sys

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        port = _free_port()
        log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        endpoint = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 60
            while True:
                try:
                    urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).read()
                    break
                except OSError:
                    if time.time() > deadline or proc.poll() is not None:
                        raise RuntimeError("moto server did not start") from None
                    time.sleep(0.2)
            yield endpoint
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
            log.close()


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
    # the partition column comes from the table's log
    per_day = r.sql("SELECT run_date, count(*) AS n FROM results GROUP BY run_date ORDER BY run_date").to_pylist()
    exp_days = loc.truth.group_by("run_date").aggregate([("path", "count")]).sort_by("run_date").to_pylist()
    assert [(d["run_date"], d["n"]) for d in per_day] == [(d["run_date"], d["path_count"]) for d in exp_days]
    assert [run.run_id for run in r.runs] == [run[0] for run in RUNS]
    assert r.runs[-1].rows == 0 and r.runs[-1].run_date == "2026-11-28"
    assert r.version == len(RUNS)  # version 0 created the table, then one commit per run


def test_sql_parameters_and_pandas(loc):
    r = loc.results()
    t = r.sql("SELECT count(*) AS n FROM results WHERE run_date = ? AND status = ?", ["2026-11-26", "error"])
    day = loc.truth.filter(pc.and_(pc.equal(loc.truth["run_date"], "2026-11-26"),
                                   pc.equal(loc.truth["status"], "error")))
    assert t.to_pylist() == [{"n": day.num_rows}]
    df = r.to_pandas("SELECT path FROM results ORDER BY path LIMIT 3")
    assert list(df.columns) == ["path"] and len(df) == 3
    assert len(r.to_pandas(r.errors())) == r.errors().num_rows


def test_new_commit_visible_after_refresh(loc, tmp_path):
    r = loc.results()
    before = r.sql("SELECT count(*) AS n FROM results").to_pylist()[0]["n"]
    # the crashed run is run again and commits (another process: a new table handle)
    orphan = [f for f in _data_files(loc) if ORPHAN_RUN in f]
    assert len(orphan) == 1
    files = pa.table({"file": orphan, "bytes": [1], "rows": [12], "ok": [None], "run_date": ["2026-11-27"],
                      "modified_ms": [0]}, schema=results.ACTION_SCHEMA)
    results.Committer(loc.output, loc.opts, ORPHAN_RUN, MODEL, "v0002", None).commit(
        files, {"run_id": ORPHAN_RUN, "run_date": "2026-11-27", "model_uri": f"{loc.registry}/{MODEL}",
                "model_name": MODEL, "model_version": "v0002", "rows": 12, "status": "committed"})
    assert r.sql("SELECT count(*) AS n FROM results").to_pylist()[0]["n"] == before  # cached
    assert loc.results().sql("SELECT count(*) AS n FROM results").to_pylist()[0]["n"] == before + 12  # new handle
    r.refresh()
    assert r.sql("SELECT count(*) AS n FROM results").to_pylist()[0]["n"] == before + 12
    assert r.sql(f"SELECT DISTINCT run_date FROM results WHERE run_id = '{ORPHAN_RUN}'").to_pylist() == [
        {"run_date": "2026-11-27"}]


def test_a_table_from_before_a_column_gains_it(loc, tmp_path):
    """A table whose rows were written before `ood_check` existed: the next run's commit adds the column, the older
    rows read it as null and the new ones as written."""
    out = str(tmp_path / "older") if loc.kind == "local" else storage.join(loc.output.rsplit("/", 1)[0], "older")
    older = pa.schema([f for f in results.FILE_SCHEMA if f.name != "ood_check"])
    table = results.ensure_table(out, loc.opts, schema=pa.schema([f for f in RESULTS_SCHEMA if f.name != "ood_check"]))
    rng = random.Random(3)
    runs = {"20261201T010000Z-aaaaaa": "2026-12-01", "20261202T010000Z-bbbbbb": "2026-12-02"}
    written = {}
    for run_id, day in runs.items():
        written[run_id] = _rows(rng, run_id, day, "v0002", 30, 0)
        record = {"run_id": run_id, "run_date": day, "model_name": MODEL, "model_version": "v0002", "rows": 30,
                  "status": "committed"}
        if table is not None:  # the first run: a scorer from before the column, against the table as it was
            t = pa.Table.from_pylist([{k: v for k, v in r.items() if k in older.names} for r in written[run_id]],
                                     schema=older)
            files = results.write_files(t, out, loc.opts, run_id, day)
            results.Committer(out, loc.opts, run_id, MODEL, "v0002", None, table=table).commit(files, record)
            assert "ood_check" not in pa.schema(results.open_table(out, loc.opts).schema().to_arrow()).names
            table = None
        else:
            _write_run(out, run_id, day, [pa.Table.from_pylist(written[run_id], schema=results.FILE_SCHEMA)], record,
                       loc.opts)
    got = Results(out, loc.opts).sql("SELECT run_id, path, ood_check FROM results ORDER BY path").to_pylist()
    assert len(got) == 60
    new = {r["path"]: r["ood_check"] for r in written["20261202T010000Z-bbbbbb"]}
    assert any(new.values())
    for r in got:
        assert r["ood_check"] == (new[r["path"]] if r["run_id"] == "20261202T010000Z-bbbbbb" else None)
    assert "ood_check" in pa.schema(results.open_table(out, loc.opts).schema().to_arrow()).names


def _data_files(loc: Loc) -> list[str]:
    """Data files under the table folder (relative paths), committed or not."""
    fs, root = storage.filesystem(loc.output, loc.opts)
    fs.invalidate_cache()
    return sorted(f[len(root) + 1:] for f in fs.find(root) if f.endswith(".parquet") and "/_delta_log/" not in f)


# ---------------------------------------------------------------------------------------------------------------
# time travel


def test_as_of_version_and_time(loc):
    r = loc.results()
    hist = {h["version"]: h for h in r.table.history()}
    first_two = {run for run, *_ in RUNS[:2]}
    exp = loc.truth.filter(pc.is_in(loc.truth["run_id"], pa.array(sorted(first_two))))
    for as_of in (2, "2", dt.datetime.fromtimestamp(hist[2]["timestamp"] / 1000, dt.timezone.utc),
                  dt.datetime.fromtimestamp(hist[2]["timestamp"] / 1000, dt.timezone.utc).isoformat()):
        old = Results(loc.output, loc.opts, as_of=as_of)
        assert old.version == 2
        t = old.sql("SELECT * FROM results")
        assert t.num_rows == exp.num_rows and set(t["run_id"].to_pylist()) == first_two
        assert [run.run_id for run in old.runs] == [run[0] for run in RUNS[:2]]
        assert old.summary().num_rows == 2 and old.run_table()["run_id"].to_pylist() == [run[0] for run in RUNS[:2]]
    # the review queue as it was then
    flagged = exp.filter(pc.and_(pc.fill_null(exp["needs_review"], False), pc.equal(exp["status"], "ok")))
    got = Results(loc.output, loc.opts, as_of=2).review(limit=None)
    assert got["path"].to_pylist() == flagged.sort_by([("confidence", "ascending"), ("path", "ascending")])["path"].to_pylist()
    # every command takes --as-of
    for argv in (("query", "SELECT count(*) AS n FROM results"), ("report", "summary"), ("report", "review"),
                 ("report", "errors"), ("report", "drift"), ("report", "runs")):
        rc, out, err = loc.cli(*argv, "--as-of", "2", "--format", "json")
        assert rc == 0, (argv, err)
        if argv[0] == "query":
            assert json.loads(out) == [{"n": exp.num_rows}]
        if argv[-1] == "runs":
            assert [x["run_id"] for x in json.loads(out)] == [run[0] for run in RUNS[:2]]
    # clear errors: a version that does not exist, a time before the table, nonsense
    with pytest.raises(QueryError, match=r"has no version 99 \(latest: 5\)"):
        Results(loc.output, loc.opts, as_of=99).sql("SELECT 1")
    with pytest.raises(QueryError, match="did not exist yet at 2001-01-01"):
        Results(loc.output, loc.opts, as_of="2001-01-01").sql("SELECT 1")
    with pytest.raises(NoRunsError, match="has no commit of a scoring run at version 0"):  # the table's creation
        Results(loc.output, loc.opts, as_of=0).sql("SELECT 1")
    with pytest.raises(QueryError, match="as_of must be a table version"):
        Results(loc.output, loc.opts, as_of="yesterday")
    rc, out, err = loc.cli("report", "summary", "--as-of", "99")
    assert rc == 2 and "has no version 99" in err


def test_report_runs(loc):
    r = loc.results()
    runs = r.run_table().to_pylist()
    assert [x["run_id"] for x in runs] == [run[0] for run in RUNS]
    assert [x["first_version"] for x in runs] == list(range(1, len(RUNS) + 1))
    assert all(x["status"] == "committed" and x["commits"] == 1 for x in runs)
    assert [x["rows"] for x in runs] == [sum(run[4]) for run in RUNS]
    assert [x["model"] for x in runs] == [f"{MODEL}:{run[2]}" for run in RUNS]
    assert [x["run_id"] for x in r.run_table(since="2026-11-26", until="2026-11-26").to_pylist()] == \
        [run[0] for run in RUNS if run[1] == "2026-11-26"]
    rc, out, err = loc.cli("report", "runs", "--format", "csv")
    assert rc == 0 and len(list(csv.reader(io.StringIO(out)))) == len(RUNS) + 1


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
    assert {"path", "confidence", "predicted_class", "review_reason", "ood_score", "run_date", "run_id"} <= set(full.schema.names)
    for c, why in zip(full["confidence"].to_pylist(), full["review_reason"].to_pylist()):
        assert (c < 0.6) == ("low_confidence" in why) and why
    # by reason: what the guard flagged (alone or with low confidence), and only that
    ood = r.review(limit=None, reason="out_of_distribution")
    expected = flagged.filter(pc.equal(flagged["in_distribution"], False))
    assert ood.num_rows > 0 and sorted(ood["path"].to_pylist()) == sorted(expected["path"].to_pylist())
    assert all(s > 0.5 for s in ood["ood_score"].to_pylist())
    scores = ood["ood_score"].to_pylist()
    assert ood["ood_check"].to_pylist() == [("knn,structure" if s > 0.58 else "knn") for s in scores]
    low = r.review(limit=None, reason="low_confidence")
    assert all(c < 0.6 for c in low["confidence"].to_pylist()) and low.num_rows + ood.num_rows >= full.num_rows
    # by one of the guard's checks: the rows it flagged, and only those
    structure = r.review(limit=None, reason="structure")
    assert structure.num_rows > 0
    assert sorted(structure["path"].to_pylist()) == sorted(
        p for p, s in zip(expected["path"].to_pylist(), expected["ood_score"].to_pylist()) if s > 0.58)
    assert sorted(r.review(limit=None, reason="knn")["path"].to_pylist()) == sorted(ood["path"].to_pylist())
    assert r.review(limit=None, reason="colour").num_rows == 0
    with pytest.raises(QueryError, match="'blurry'.*low_confidence, out_of_distribution, knn, optics, colour, structure"):
        r.review(reason="blurry")
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
        assert x["ood_rate"] == (None if version == "v0001" else 0.03) and x["ood_p_value"] is None
        assert x["shift"] == (None if version == "v0001" else 0.5) and x["shift_p_value"] is None
    scored = [x for x in rows if x["source"] == "scored"]
    expected = _expected_drift(loc.truth)
    assert [(x["run_date"], x["model"]) for x in scored] == sorted(expected)
    for x in scored:
        exp = expected[(x["run_date"], x["model"])]
        for k, v in exp.items():
            assert x[k] == pytest.approx(v, rel=1e-9), (x["run_date"], k)
        assert sum(x[c] for c in CLASSES) == pytest.approx(1.0)
        # the daily out-of-distribution rate: null for the model without a guard
        day = loc.truth.filter(pc.and_(pc.equal(loc.truth["run_date"], x["run_date"]),
                                       pc.equal(loc.truth["status"], "ok")))
        day = day.filter(pc.equal(day["model_version"], x["model"].split(":")[1]))
        if x["model"].endswith("v0001"):
            assert x["ood_rate"] is None and x["ood_p_value"] is None
            assert x["shift"] is None and x["shift_p_value"] is None  # no medians on the card
            assert x["ood_knn_rate"] is x["ood_colour_rate"] is x["ood_structure_rate"] is None
        else:
            rate = pc.sum(pc.cast(pc.invert(day["in_distribution"]), pa.int64())).as_py() / day.num_rows
            assert x["ood_rate"] == pytest.approx(rate)
            # which check: every flagged row names knn, the farthest ones structure too (as generated)
            checks = [c or "" for c in day["ood_check"].to_pylist()]
            for name in ("knn", "optics", "colour", "structure"):
                assert x[f"ood_{name}_rate"] == pytest.approx(sum(name in c for c in checks) / day.num_rows)
            assert x["ood_knn_rate"] == pytest.approx(rate) and x["ood_colour_rate"] == 0
            # a fifth of the rows flagged where the guard flags 3 % in distribution: far more than chance
            from scipy.stats import binom

            flagged = round(rate * day.num_rows)
            assert x["ood_p_value"] == pytest.approx(binom.sf(flagged - 1, day.num_rows, 0.03), rel=1e-9)
            assert rate > 0.1 and x["ood_p_value"] < 0.01
            # the shift: rows above their predicted class's validation median, a sign test against one half
            from scipy.stats import binomtest

            median = {c: SCORE_MEDIAN["all"] if m is None else m for c, m in zip(CLASSES, SCORE_MEDIAN["by_class"])}
            above = sum(sc > median[c] for sc, c in zip(day["ood_score"].to_pylist(), day["predicted_class"].to_pylist()))
            assert x["shift"] == pytest.approx(above / day.num_rows)
            assert x["shift_p_value"] == pytest.approx(binomtest(above, day.num_rows, 0.5, alternative="greater").pvalue)
    # day 3 was generated with a strongly shifted mix
    d3 = next(x for x in scored if x["run_date"] == "2026-11-27")
    assert d3["tv_distance"] > 0.2 and d3["p_value"] < 0.01
    # and mostly Benign rows, whose validation median (0.2) most of their scores exceed
    assert d3["shift"] > 0.6 and d3["shift_p_value"] < 0.01
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


def test_drift_alert_names_the_days_that_moved(loc):
    """`report drift --alert` for a nightly monitor: the day whose rows the guard flagged far above its validation
    rate, and whose rows lie mostly above their class's validation median, is named on stderr with exit code 1;
    days without a guard, or a window without such a day, pass with 0."""
    from scipy.stats import binomtest

    d3 = loc.truth.filter(pc.and_(pc.equal(loc.truth["run_date"], "2026-11-27"), pc.equal(loc.truth["status"], "ok")))
    n = d3.num_rows
    flagged = pc.sum(pc.cast(pc.invert(d3["in_distribution"]), pa.int64())).as_py()
    assert binomtest(flagged, n, 0.03, alternative="greater").pvalue < 0.001  # as generated: far above 3 %

    rc, out, err = loc.cli("report", "drift", "--alert", "--format", "json")
    assert rc == 1
    assert len(json.loads(out)) == loc.results().drift().num_rows  # the table as without --alert
    lines = err.splitlines()
    head = f"alert: 2026-11-27 {MODEL}:v0002 ({n} images): "
    assert len(lines) == 2 and all(x.startswith(head) for x in lines), err
    assert f"{100 * flagged / n:.1f} % out of distribution where the guard flags 3.0 % of its validation" in lines[0]
    assert lines[0].endswith("most by knn (unlike every training image): "
                             "leukray report review --reason knn --since 2026-11-27 --until 2026-11-27")
    assert "of the images lie farther from the training images than the median validation image" in lines[1]

    # a stricter shift or alpha drops what does not pass it; the class mix only when asked
    rc, _, err = loc.cli("report", "drift", "--alert", "--min-shift", "0.99")
    assert rc == 1 and len(err.splitlines()) == 1 and "out of distribution" in err
    rc, _, err = loc.cli("report", "drift", "--alert", "--max-tv", "0.2")
    mix = [x for x in err.splitlines() if "class mix" in x]
    assert rc == 1 and len(mix) == 1 and mix[0].startswith(head), err
    # the days scored by the package without a guard: nothing to alert on
    rc, _, err = loc.cli("report", "drift", "--alert", "--until", "2026-11-26")
    assert rc == 0 and err == ""
    # without --alert the same day is a table, exit 0
    assert loc.cli("report", "drift")[0] == 0


@pytest.mark.parametrize("pattern", [r"-0-\d(\d)\d\.jpg$", r"-0-0(0)\d\.jpg$"])
def test_drift_shift_grouped_by_slide(loc, pattern):
    """`--group-by`: the shift's sign test counts groups (here: the tens of each file's number, five of 7-9 rows;
    or only the first ten files as one group, every other row a group of its own), a group above when most of its
    rows are; the fraction itself stays the rows'."""
    import re

    from scipy.stats import binomtest

    d3 = loc.truth.filter(pc.and_(pc.equal(loc.truth["run_date"], "2026-11-27"), pc.equal(loc.truth["status"], "ok")))
    median = {c: SCORE_MEDIAN["all"] if m is None else m for c, m in zip(CLASSES, SCORE_MEDIAN["by_class"])}
    groups: dict[str, list[int]] = {}
    for path, score, cls in zip(d3["path"].to_pylist(), d3["ood_score"].to_pylist(), d3["predicted_class"].to_pylist()):
        m = re.search(pattern, path)
        g = groups.setdefault(m.group(1) if m else path, [0, 0])
        g[0] += score > median[cls]
        g[1] += 1
    k = sum(2 * a > c for a, c in groups.values())
    n = k + sum(2 * a < c for a, c in groups.values())
    rc, out, err = loc.cli("report", "drift", "--since", "2026-11-27", f"--group-by={pattern}", "--alert",
                           "--format", "json")
    day = json.loads(out)[1]
    assert day["shift_groups"] == len(groups) and day["shift_groups"] < d3.num_rows
    assert day["shift_p_value"] == pytest.approx(binomtest(k, n, 0.5, alternative="greater").pvalue)
    assert day["shift"] == pytest.approx(sum(a for a, _ in groups.values()) / d3.num_rows)
    # the five groups: p ≥ 1/32, no shift alert (the images alone gave p < 0.001); the out-of-distribution one stays
    shift_alerts = [x for x in err.splitlines() if "farther from the training images" in x]
    if len(groups) == 5:
        assert not shift_alerts and day["shift_p_value"] >= 1 / 32
    else:
        assert (day["shift_p_value"] < 0.001) == bool(shift_alerts)
        assert all(f"groups): another camera" in x for x in shift_alerts)
    assert rc == 1 and "out of distribution" in err
    # without it: images, no group count
    ungrouped = loc.results().drift(since="2026-11-27").to_pylist()[1]
    assert ungrouped["shift_groups"] is None and ungrouped["shift_p_value"] < day["shift_p_value"]


@pytest.mark.parametrize("pattern, message", [("(", "is not a regular expression"),
                                              (r"\.jpg$", "must have exactly one group .* it has 0"),
                                              (r"(\d)-(\d)", "it has 2")])
def test_drift_group_by_bad_pattern_is_named(loc, pattern, message):
    with pytest.raises(QueryError, match=message):
        loc.results().drift(group_by=pattern)
    with pytest.raises(QueryError, match=message):  # days of a package without the medians too
        loc.results().drift(until="2026-11-25", group_by=pattern)
    rc, _, err = loc.cli("report", "drift", f"--group-by={pattern}")
    assert rc == 2 and err.startswith(f"error: --group-by {pattern!r}")


@pytest.mark.parametrize("option, value", [("--alpha", "5"), ("--alpha", "0"), ("--min-shift", "high"),
                                           ("--max-tv", "1.5")])
def test_drift_alert_bad_number_is_named(capsys, option, value):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["report", "drift", "--alert", option, value])
    assert e.value.code == 2
    assert f"argument {option}: '{value}' is not a number between 0 and 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# clear errors


def test_no_runs(loc):
    empty = storage.join(loc.output.rsplit("/", 1)[0], "empty-prefix")
    with pytest.raises(NoRunsError) as err:
        Results(empty, loc.opts).sql("SELECT 1")
    expected = storage.join(empty, "_delta_log")
    assert str(err.value) == f"no scoring runs found under {empty} (no Delta table: expected {expected}/)"
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


def test_committed_file_missing(loc):
    gone = next(f for f in _data_files(loc) if "aaaaaa" in f)
    fs, root = storage.filesystem(loc.output, loc.opts)
    fs.rm(f"{root}/{gone}")
    with pytest.raises(QueryError, match="aaaaaa"):
        loc.results().sql("SELECT count(*) FROM results")


def test_previous_layout_is_a_clear_error(loc):
    """An output in the previous layout (results/ + _runs/) is refused with the conversion command."""
    old = storage.join(loc.output.rsplit("/", 1)[0], "old-layout")
    storage.write_json(storage.join(old, "_runs", "20261129T031500Z-gggggg.json"), {"files": []}, loc.opts)
    command = f"leukray score --convert-legacy {old}"
    with pytest.raises(LegacyLayoutError, match=re.escape(command)):
        Results(old, loc.opts).summary()
    rc, out, msg = Loc(loc.kind, old, loc.registry, loc.opts, loc.truth, loc.endpoint).cli("query", "SELECT 1")
    assert rc == 2 and out == "" and "previous layout" in msg and command in msg


def _legacy_rows(folder: Path) -> pa.Table:
    """The committed rows of a previous-layout output, read the previous way (manifest files + hive run_date)."""
    rows = []
    for m in sorted(folder.glob("_runs/*.json")):
        manifest = json.loads(m.read_text())
        for rel in manifest["files"]:
            t = pq.read_table(folder / rel)
            rows.append(t.append_column("run_date", pa.array([manifest["run_date"]] * t.num_rows, pa.string())))
    return pa.concat_tables(rows)


def test_convert_previous_layout(loc, tmp_path):
    """`leukray score --convert-legacy OUTPUT` on an output the previous scorer wrote (plus the leftovers of a
    crashed run): the same rows and run records in a Delta table, the old layout gone, a second call a no-op."""
    from leukray.cli import main

    local = tmp_path / "legacy"
    shutil.copytree(LEGACY, local)
    old = _legacy_rows(local)  # written before the guard's columns existed: they convert as nulls
    expected = pa.table({f.name: old[f.name].cast(f.type) if f.name in old.column_names else pa.nulls(old.num_rows, f.type)
                         for f in RESULTS_SCHEMA}, schema=RESULTS_SCHEMA)
    manifests = [json.loads(m.read_text()) for m in sorted(local.glob("_runs/*.json"))]
    # leftovers of a crashed run: a data file no manifest lists, a staging folder
    crashed = local / "results" / "run_date=2026-12-01" / "20261201T000000Z-dead00-0.parquet"
    shutil.copy(next(local.glob("results/run_date=2026-11-30/*.parquet")), crashed)
    (local / "_staging" / "20261201T000000Z-dead00").mkdir(parents=True)
    (local / "_staging" / "20261201T000000Z-dead00" / "x.parquet").write_bytes(b"PAR1")
    out = str(local)
    if loc.kind == "s3":
        out = storage.join(loc.output.rsplit("/", 1)[0], "legacy")
        storage.upload_dir(str(local), out, loc.opts)
    with pytest.raises(LegacyLayoutError):
        Results(out, loc.opts).summary()
    argv = ["score", "--convert-legacy", out] + (["--set", f"storage.endpoint_url={loc.endpoint}"] if loc.endpoint else [])
    assert main(argv) == 0
    r = Results(out, loc.opts)
    got = r.sql("SELECT * EXCLUDE (reviewed_class, reviewed_by, reviewed_at) FROM results")  # the scored columns
    order = [("path", "ascending"), ("run_id", "ascending")]
    assert got.sort_by(order).equals(expected.sort_by(order))
    assert [x.run_id for x in r.runs] == [m["run_id"] for m in manifests]
    for run, m in zip(r.runs, manifests):
        for key in ("run_date", "model_name", "model_version", "model_uri", "counts", "throughput", "execution",
                    "config", "started_at", "finished_at", "rows"):
            assert run.raw[key] == m[key], key
        assert run.status == "committed"
    summary = {x["run_id"]: x for x in r.summary().to_pylist()}
    assert summary[manifests[-1]["run_id"]]["files"] == 0  # the run that found nothing new is kept too
    fs, root = storage.filesystem(out, loc.opts)
    fs.invalidate_cache()
    left = [f for f in fs.find(root)]
    assert not [f for f in left if "/results/" in f or "/_runs/" in f or "/_staging/" in f], left
    assert main(argv) == 2  # nothing left to convert: a clear error, the table untouched
    assert Results(out, loc.opts).version == r.version


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
    from leukray.report import write_table

    t = pa.table({"a": [math.inf, math.nan, 1.5], "b": ["x", None, "z"]})
    out = io.StringIO()
    write_table(t, "json", out)
    assert json.loads(out.getvalue()) == [{"a": None, "b": "x"}, {"a": None, "b": None}, {"a": 1.5, "b": "z"}]


def test_only_empty_runs(tmp_path):
    """Committed runs that found nothing to score: an empty view, zero rows in the per-run summary."""
    out = str(tmp_path / "score")
    _write_run(out, "20261128T031500Z-ffffff", "2026-11-28", [],
               {"run_id": "20261128T031500Z-ffffff", "run_date": "2026-11-28", "rows": 0, "status": "committed"})
    r = Results(out)
    assert r.sql("SELECT count(*) AS n FROM results").to_pylist() == [{"n": 0}]
    (row,) = r.summary().to_pylist()
    assert row["run_id"] == "20261128T031500Z-ffffff" and row["run_date"] == "2026-11-28" and row["files"] == 0
    assert r.summary(by="day").num_rows == r.review().num_rows == r.errors().num_rows == 0
    assert r.drift().num_rows == 0


NO_TORCH = """
import sys
from leukray.cli import main
import leukray.query
argv = sys.argv[1:]
for cmd in (["query", "SELECT count(*) AS n FROM results"], ["report", "summary"], ["report", "review"],
            ["report", "errors"], ["report", "runs"], ["report", "drift", "--plot", argv[-1]]):
    assert main(cmd + argv[:-1]) == 0, cmd
heavy = sorted(m for m in ("torch", "torchvision", "ray") if m in sys.modules)
assert not heavy, f"loaded {heavy}"
print("ok")
"""


def test_query_and_reports_load_no_torch(tmp_path):
    """`leukray query` and every `leukray report` (drift reads model cards through the registry) run without
    importing torch or Ray: the results layout, the registry's card reading and the reports are torch-free."""
    out = str(tmp_path / "score")
    build_outputs(str(tmp_path), out, str(tmp_path / "registry"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-c", NO_TORCH, "--output", out, str(tmp_path / "mix.png")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "mix.png").stat().st_size > 0

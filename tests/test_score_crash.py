"""Scoring runs that die, and runs that race, on a local Ray cluster, into a results table on a local folder and on
a moto S3 server (both on 127.0.0.1):

- the scoring driver SIGKILLed after the workers wrote their first data files: no row of that run is visible to
  DuckDB (leukray.query), to pyarrow through deltalake or to ray.data.read_delta; the rerun scores those files once;
- the same with progressive commits: what was committed before the kill stays, the rerun scores only the rest;
- a scoring actor SIGKILLed mid-run: the run completes (Ray restarts the actor) or fails cleanly; after a rerun
  every input file has exactly one row;
- two runs at once on the same files (two `ray job submit`s): never a duplicated or lost row, and a run that stops
  says why; two runs at once on different files: both commit;
- an output in the previous layout: scoring refuses it and names the conversion command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localcluster import REPO, job_env, make_bucket, read_with_ray, submit_job  # noqa: E402

from leukray import results, storage  # noqa: E402
from leukray.config import StorageOptions  # noqa: E402
from leukray.images import is_image_name  # noqa: E402
from leukray.query import NoRunsError, Results  # noqa: E402
from leukray.synth import make_dataset  # noqa: E402


@pytest.fixture(scope="module")
def package(tiny_package):
    return str(tiny_package / "pkg")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """40 small smears, in two halves (a/ and b/)."""
    root = tmp_path_factory.mktemp("archive") / "archive"
    make_dataset(root / "a", per_class=5, size=40, seed=11)
    make_dataset(root / "b", per_class=5, size=40, seed=12)
    return root


_counter = [0]


def _where(kind: str, cluster, tmp_path, archive, package) -> dict:
    """A fresh output (and the archive + model where the run reads them) for one test."""
    _counter[0] += 1
    endpoint = cluster["s3_endpoint"]
    opts = StorageOptions(endpoint_url=endpoint, key="testing", secret="testing")
    if kind == "local":
        return {"kind": kind, "input": str(archive), "output": str(tmp_path / "out"), "model": package,
                "opts": opts, "endpoint": endpoint}
    bucket = f"crash{_counter[0]}"
    make_bucket(endpoint, bucket)
    storage.upload_dir(str(archive), f"s3://{bucket}/archive", opts)
    return {"kind": kind, "input": f"s3://{bucket}/archive", "output": f"s3://{bucket}/scores", "model": package,
            "opts": opts, "endpoint": endpoint}


def _config(loc: dict, tmp_path: Path, name: str = "score.yaml", **extra) -> Path:
    cfg = {"input": loc["input"], "output": loc["output"], "model": loc["model"],
           # explicit (fake) credentials: with the environment's, Arrow's S3 client in the workers sends aws-chunked
           # bodies with a trailing checksum that the moto server stores undecoded
           "storage": {"endpoint_url": loc["endpoint"], "key": "testing", "secret": "testing"}, "batch_size": 2, "decode_batch_size": 2,
           "files_per_block": 2, "max_rows_per_file": 2, **extra}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _driver_env(cluster) -> dict:
    """A driver started by hand (not `ray job submit`) that joins the cluster: RAY_ADDRESS is the GCS address."""
    env = job_env(cluster)
    env["RAY_ADDRESS"] = cluster["ray_address"]
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _data_files(loc: dict) -> list[str]:
    fs, root = storage.filesystem(loc["output"], loc["opts"])
    fs.invalidate_cache()
    try:
        return [f for f in fs.find(root) if f.endswith(".parquet") and "/_delta_log/" not in f]
    except FileNotFoundError:
        return []


def _versions(loc: dict) -> int:
    try:
        return results.table_version(loc["output"], loc["opts"])
    except Exception:  # noqa: BLE001 - no table yet
        return -1


def _start_and_kill(cluster, config: Path, ready, what: str) -> subprocess.CompletedProcess:
    """Start jobs/score.py as a driver joining the cluster; SIGKILL it as soon as `ready()` holds."""
    log = config.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "jobs/score.py", "--config", str(config)], cwd=REPO,
                                env=_driver_env(cluster), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not ready():
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the run ended ({proc.returncode}) before {what}:\n{text[-4000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, text, "")


def _run(cluster, config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/score.py", "--config", str(config), *extra], cwd=REPO,
                          env=_driver_env(cluster), capture_output=True, text=True, timeout=600)


def _three_readers(cluster, loc: dict, tmp_path: Path) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(DuckDB via leukray.query, pyarrow via deltalake, ray.data.read_delta in a Ray job) over the latest version."""
    from deltalake import DeltaTable

    uri, so = results.table_uri(loc["output"]), results.delta_storage_options(loc["output"], loc["opts"])
    try:
        duck = Results(loc["output"], loc["opts"]).sql("SELECT path, run_id FROM results")
    except NoRunsError:
        duck = pa.table({"path": pa.array([], pa.string()), "run_id": pa.array([], pa.string())})
    plain = DeltaTable(uri, storage_options=so).to_pyarrow_table(columns=["path", "run_id"])
    via_ray = read_with_ray(cluster, loc["output"], tmp_path).select(["path", "run_id"])
    return duck, plain, via_ray


def _inputs(loc: dict, archive: Path) -> list[str]:
    files = sorted(p for p in archive.rglob("*") if p.is_file() and is_image_name(p.name))
    if loc["kind"] == "local":
        return [str(p) for p in files]
    return [f"{loc['input']}/{p.relative_to(archive).as_posix()}" for p in files]


def _exactly_once(loc: dict, archive: Path) -> pa.Table:
    t = Results(loc["output"], loc["opts"]).sql("SELECT path, count(*) AS n FROM results GROUP BY path")
    assert sorted(t["path"].to_pylist()) == _inputs(loc, archive)
    assert set(t["n"].to_pylist()) == {1}
    return t


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_driver_killed_before_its_commit(cluster, tmp_path, archive, package, kind):
    loc = _where(kind, cluster, tmp_path, archive, package)
    config = _config(loc, tmp_path)
    # a committed run first (4 files), so that the table has rows the killed run must not add to
    first = _run(cluster, _config(loc, tmp_path, "first.yaml", limit=4))
    assert first.returncode == 0, first.stderr[-4000:]
    committed = _data_files(loc)
    version = _versions(loc)
    _start_and_kill(cluster, config, lambda: len(_data_files(loc)) > len(committed), "its workers wrote a data file")
    assert len(_data_files(loc)) > len(committed)  # the killed run's files are there …
    assert _versions(loc) == version  # … but it made no commit
    for reader in _three_readers(cluster, loc, tmp_path):  # … so no reader sees one of its rows
        assert reader.num_rows == 4 and len(set(reader["run_id"].to_pylist())) == 1
    again = _run(cluster, config)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "files seen 40, scored 36, skipped as already scored 4" in again.stdout, again.stdout
    _exactly_once(loc, archive)
    duck, plain, via_ray = _three_readers(cluster, loc, tmp_path)
    assert duck.num_rows == plain.num_rows == via_ray.num_rows == 40
    # the killed run's stray files: kept while young (a running run's could be), removed by a vacuum without
    # retention
    stray = set(_data_files(loc)) - {f"{results.table_uri(loc['output']).split('://', 1)[-1]}/{p}"
                                     for p in Results(loc["output"], loc["opts"]).files}
    assert stray
    vac = subprocess.run(
        [sys.executable, "-m", "leukray.cli", "score", "--config", str(config), "--vacuum", "--set",
         "vacuum_retention_hours=0"], cwd=REPO, env=_driver_env(cluster), capture_output=True, text=True, timeout=300)
    assert vac.returncode == 0, vac.stderr
    assert not stray & set(_data_files(loc))
    _exactly_once(loc, archive)


def test_driver_killed_after_progressive_commits(cluster, tmp_path, archive, package):
    """commit_every_files=6: killed after its first commit, the run's committed rows stay; the rerun scores only
    the rest."""
    loc = _where("s3", cluster, tmp_path, archive, package)
    config = _config(loc, tmp_path, commit_every_files=6)
    _start_and_kill(cluster, config, lambda: _versions(loc) >= 1, "its first commit")
    r = Results(loc["output"], loc["opts"])
    (run,) = r.runs
    assert run.status == "running" and run.rows >= 6
    kept = r.sql("SELECT count(*) AS n FROM results").to_pylist()[0]["n"]
    assert kept == run.rows < 40
    again = _run(cluster, config)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"skipped as already scored {kept}" in again.stdout, again.stdout
    _exactly_once(loc, archive)
    runs = Results(loc["output"], loc["opts"]).run_table().to_pylist()
    assert [x["status"] for x in runs] == ["running", "committed"]
    assert runs[1]["commits"] >= 2 and runs[1]["scored"] + runs[1]["errors"] == 40 - kept


def _scorer_pids(cluster) -> list[int]:
    """Ray worker processes of THIS cluster (children of its raylet, which runs with its temp dir) that host a
    scoring actor."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "_Scorer" not in cmd or "MapWorker" not in cmd:
            continue
        try:
            parent = " ".join(p.parent().cmdline())
        except (psutil.Error, AttributeError):
            continue
        if cluster["temp_dir"] in parent:
            pids.append(p.info["pid"])
    return pids


def test_scoring_actor_killed(cluster, tmp_path, archive, package):
    loc = _where("local", cluster, tmp_path, archive, package)
    config = _config(loc, tmp_path, tta="dihedral8")
    log = tmp_path / "actor.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "jobs/score.py", "--config", str(config)], cwd=REPO,
                                env=_driver_env(cluster), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        killed = []
        while proc.poll() is None and time.time() < deadline and not killed:
            if _data_files(loc):
                for pid in _scorer_pids(cluster):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)
        proc.wait(timeout=600)
    text = log.read_text(errors="replace")
    assert killed, f"no scoring actor found to kill:\n{text[-3000:]}"
    if proc.returncode != 0:  # failed cleanly: a clear message, then the rerun completes the archive
        assert proc.returncode == 2 and "score: error: run" in text, text[-4000:]
    again = _run(cluster, config)
    assert again.returncode == 0, again.stderr[-4000:]
    _exactly_once(loc, archive)


def test_two_runs_at_once(cluster, tmp_path, archive, package):
    """Two `ray job submit`s on the same files: each file one row, a run that stops says why. Then two on
    different files (the archive's halves): both commit."""
    loc = _where("s3", cluster, tmp_path, archive, package)
    config = _config(loc, tmp_path)
    res: dict[int, subprocess.CompletedProcess] = {}

    def go(i: int, cfg: Path) -> None:
        res[i] = submit_job(cluster, [sys.executable, "jobs/score.py", "--config", str(cfg)], working_dir=REPO,
                            timeout=600)

    threads = [threading.Thread(target=go, args=(i, config)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in res.values():
        assert r.returncode == 0 or "another scoring run" in r.stdout, r.stdout[-4000:]
    _exactly_once(loc, archive)
    committed = [x for x in Results(loc["output"], loc["opts"]).runs if x.status == "committed"]
    assert len(committed) == sum(r.returncode == 0 for r in res.values())

    # different files at once: both commit
    loc2 = dict(loc, output=loc["output"] + "-halves")
    halves = [_config(dict(loc2, input=f"{loc['input']}/{h}"), tmp_path, f"{h}.yaml") for h in ("a", "b")]
    threads = [threading.Thread(target=go, args=(i, cfg)) for i, cfg in enumerate(halves)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in res.values():
        assert r.returncode == 0, r.stdout[-4000:]
    r = Results(loc2["output"], loc2["opts"])
    assert [x.status for x in r.runs] == ["committed", "committed"]
    _exactly_once(loc2, archive)


def test_previous_layout_refused(tmp_path, package):
    """Scoring into an output in the previous layout fails before any work, naming the conversion command."""
    from leukray.score import ScoreConfig, ScoreError, run

    out = tmp_path / "old"
    (out / "_runs").mkdir(parents=True)
    (out / "_runs" / "20261129T031500Z-gggggg.json").write_text('{"files": []}')
    make_dataset(tmp_path / "in", per_class=1, size=40, seed=1)
    with pytest.raises(ScoreError, match=f"leukray score --convert-legacy {out}"):
        run(ScoreConfig(input=str(tmp_path / "in"), output=str(out), model=package))


def test_workers_import_this_checkout(cluster, tmp_path):
    """Drivers started here and the Ray workers they start import leukray from this checkout (or the job's copy
    of it), not from another installed copy."""
    code = ("import ray, leukray; ray.init(); "
            "print('DRIVER', leukray.__file__); "
            "print('WORKER', ray.get(ray.remote(lambda: __import__('leukray').__file__).remote()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_driver_env(cluster), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    paths = [line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith(("DRIVER", "WORKER"))]
    assert len(paths) == 2 and all(p.startswith(str(REPO)) for p in paths), r.stdout

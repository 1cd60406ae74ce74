"""Hyperparameter search (leukray.search, jobs/tune.py) against a real local Ray cluster + moto S3 on 127.0.0.1:
`ray job submit` of the smoke search, resume after the driver is killed, storage on S3, config validation."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localcluster import REPO, job_env, make_bucket, submit_job  # noqa: E402

from leukray.config import ConfigError, StorageOptions  # noqa: E402
from leukray.search import load_search_config  # noqa: E402

SMOKE = str(REPO / "configs" / "tune-smoke.yaml")
EXCLUDES = [".venv", ".git", "runs", "data", "out", "**/__pycache__", "*.egg-info", ".pytest_cache", "shared"]
S3_CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    from leukray.synth import make_dataset

    out = tmp_path_factory.mktemp("synth") / "smoke"
    make_dataset(out, per_class=30, size=48, seed=0)
    return str(out)


def _summary(output: str) -> dict:
    lines = [l for l in output.splitlines() if l.startswith("SEARCH_SUMMARY ")]
    assert lines, output[-5000:]
    return json.loads(lines[-1][len("SEARCH_SUMMARY "):])


def _trial_status(exp_dir: Path) -> dict[str, str]:
    files = sorted(glob.glob(str(exp_dir / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        state = json.loads(Path(files[-1]).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for entry in state["trial_data"]:
        t = json.loads(entry[0])
        out[t["trial_id"]] = t["status"]
    return out


def _result_rows(exp_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for f in glob.glob(str(exp_dir / "*" / "result.json")):
        rows = [json.loads(l) for l in Path(f).read_text().splitlines() if l.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def _check_card_matches_trials(card: dict, trials) -> None:
    df = trials.to_pandas()
    s = card["search"]
    metric = s["metric"]
    best = df[df["rank"] == 1].iloc[0]
    assert s["best_trial"]["trial_id"] == best["trial_id"]
    assert best[f"best_{metric}"] == pytest.approx(df[f"best_{metric}"].min() if s["mode"] == "min"
                                                   else df[f"best_{metric}"].max())
    assert s["best_trial"][metric] == pytest.approx(best[f"best_{metric}"])
    for name, value in s["best_trial"]["params"].items():
        if isinstance(value, str):
            assert best[f"param_{name}"] == value
        else:
            assert best[f"param_{name}"] == pytest.approx(value)
    # the package's weights are that trial's best epoch: same val accuracy (temperature keeps the argmax)
    assert card["metrics"]["val"]["accuracy"] == pytest.approx(best["best_val_accuracy"])
    assert card["metrics"]["test"]["n"] > 0
    assert card["split_manifest_hash"] and card["library_versions"]["ray"] and card["library_versions"]["optuna"]
    assert card["search"]["search_config"]["space"].keys() == s["best_trial"]["params"].keys()
    assert card["config"]["lr"] == pytest.approx(s["best_trial"]["params"]["lr"])


# ----------------------------------------------------------------------------------------------- validation
def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "tune.yaml"
    p.write_text(text)
    return str(p)


SPACE = "space:\n  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n"


@pytest.mark.parametrize("text, expected", [
    (SPACE + "num_sample: 3\n", "unknown key 'num_sample'"),
    (SPACE + "train:\n  epoch: 3\n", "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    (SPACE + "train:\n  epochs: many\n", "train.epochs"),
    (SPACE + "metric: val_auc\n", "metric"),
    (SPACE + "resources: {cpu: 1, gpu: -0.5}\n", "resources.gpu"),
    (SPACE + "scheduler: {grace_period: 5}\nepochs: 2\n", "grace_period=5 exceeds epochs=2"),
    ("space:\n  learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n", "unknown hyperparameter 'learning_rate'"),
    ("space:\n  lr: {type: normal, low: 1.0e-4, high: 1.0e-2}\n", "space.lr.type"),
    ("space:\n  lr: {type: loguniform, low: 1.0e-2, high: 1.0e-4}\n", "low=0.01 must be below high=0.0001"),
    ("space:\n  lr: {type: loguniform, low: 0, high: 1.0e-2}\n", "needs low > 0"),
    ("space:\n  augment: {type: choice, values: [stain, sharpen]}\n", "augment: 'sharpen' is not a valid train.augment"),
    ("space:\n  schedule: {type: choice, values: [cosine, step]}\n", "schedule: 'step' is not a valid train.schedule: Input should be 'cosine' or 'constant'"),
    ("space:\n  dropout: {type: uniform, low: 0.1, high: 1.5}\n", "dropout: 1.5 is not a valid train.model.dropout: Input should be less than 1"),
    ("space:\n  batch_size: {type: uniform, low: 8, high: 64}\n", "batch_size: an integer hyperparameter"),
    ("space:\n  lr: {type: choice}\n", "needs a non-empty 'values'"),
    ("space: {}\n", "search space is empty"),
    ("space:\n  lr: {type: loguniform, low: 1.0e-4, high: 2.0}\n", "lr: 2.0 is not a valid train.lr: Input should be "
     "less than or equal to 1"),
    ("space:\n  head_width: {type: int, low: 16, high: 9000}\n", "head_width: 9000 is not a valid train.model.head_width"),
    ("space:\n  consistency: {type: uniform, low: -1, high: 2}\n", "consistency: -1.0 is not a valid train.consistency"),
])
def test_config_errors_name_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_search_config(_write(tmp_path, text))
    assert expected in str(err.value)
    assert str(tmp_path / "tune.yaml") in str(err.value)


def test_a_bad_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set train.epoch: unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)$"):
        load_search_config(_write(tmp_path, SPACE), {"train.epoch": 3})


def test_consistency_is_searchable(tmp_path):
    from leukray.search_config import trial_config
    cfg = load_search_config(_write(tmp_path, "space:\n  consistency: {type: uniform, low: 0.0, high: 2.0}\n"
                                    "train:\n  augment: lab\n"))
    assert trial_config(cfg.trial_base(), {"consistency": 0.5}).consistency == 0.5
    both = trial_config(cfg.trial_base(), {"consistency": 1.0, "consistency_ce": 0.5})
    assert (both.consistency, both.consistency_ce) == (1.0, 0.5)
    with pytest.raises(ValueError, match="consistency_ce=0.5 needs consistency > 0"):
        trial_config(cfg.trial_base(), {"consistency": 0.0, "consistency_ce": 0.5})
    colour = trial_config(cfg.trial_base(), {"consistency": 1.0, "consistency_ce": 0.5, "consistency_ce_copy": "colour"})
    assert colour.consistency_ce_copy == "colour"


def test_shipped_configs_validate():
    for name in ("tune.yaml", "tune-smoke.yaml"):
        cfg = load_search_config(REPO / "configs" / name)
        assert cfg.space and cfg.trial_base().monitor == cfg.metric
    real = load_search_config(REPO / "configs" / "tune.yaml")
    assert real.train.image_size == 224 and real.train.model.weights == "imagenet" and real.resources.gpu == 0.25
    # the winner is packaged with its trial's config (leukray.search → train.evaluate_and_package): the default
    # recipe's test-time mode comes through base_config and the sampled hyperparameters do not touch it
    from leukray.search_config import trial_config
    from leukray.train import TrainConfig
    from leukray.config import load_config

    recipe = load_config(TrainConfig, REPO / "configs" / "train.yaml").tta
    assert trial_config(real.trial_base(), {"lr": 1e-4, "augment": "lab"}).tta == recipe
    assert load_search_config(REPO / "configs" / "tune.yaml", {"train.tta": "none"}).trial_base().tta == "none"


def test_jobs_tune_bad_override_exits_2(tmp_path):
    res = subprocess.run([sys.executable, "jobs/tune.py", "--smoke-test", "--set", "searcher.sed=3"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "unknown key 'searcher.sed'" in res.stderr


# ----------------------------------------------------------------------------------------------- on Ray
def test_job_submit_smoke_search_publishes_best_trial(cluster, smoke_data, tmp_path):
    from leukray.registry import load_package

    storage_path, registry = tmp_path / "tune", tmp_path / "registry"
    res = submit_job(cluster, ["python", "jobs/tune.py", "--smoke-test", "--data", smoke_data,
                               "--storage-path", str(storage_path), "--registry", str(registry),
                               "--name", "submit", "--epochs", "1"],
                     working_dir=REPO, runtime_env={"excludes": EXCLUDES}, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "succeeded" in res.stdout
    s = _summary(res.stdout)
    pkg = load_package(str(registry / "leukray-smoke"))
    assert pkg.version == "v0001" and (registry / "leukray-smoke" / "LATEST").read_text().strip() == "v0001"
    assert pkg.uri == s["package"]
    trials = pq.read_table(storage_path / "submit" / "search" / "trials.parquet")
    assert trials.num_rows == 3
    _check_card_matches_trials(pkg.card, trials)
    assert pkg.card["search"]["best_trial"]["params"] == s["best_trial"]["params"]
    assert (storage_path / "submit" / "search" / "optimization_history.png").stat().st_size > 1000
    assert (storage_path / "submit" / "search" / "param_importances.png").stat().st_size > 1000
    # progress: Tune's trial table and train.fit's per-epoch lines reach the job log
    assert "Trial status" in res.stdout and "[leukray] epoch 1/1" in res.stdout


def test_resume_after_driver_killed(cluster, smoke_data, tmp_path):
    storage_path, registry = tmp_path / "tune", tmp_path / "registry"
    exp = storage_path / "resume"
    cmd = [sys.executable, "jobs/tune.py", "--smoke-test", "--data", smoke_data, "--storage-path", str(storage_path),
           "--registry", str(registry), "--name", "resume", "--set", "max_concurrent_trials=1"]
    env = job_env(cluster, {"RAY_ADDRESS": cluster["ray_address"]})
    log1 = open(tmp_path / "driver1.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if "TERMINATED" in _trial_status(exp).values():
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "driver1.log").read_text()[-4000:]
        assert "TERMINATED" in _trial_status(exp).values(), "no trial finished in time"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the driver only (its own session); its trials die with the job
        proc.wait()
        log1.close()
    before_status = _trial_status(exp)
    before_rows = _result_rows(exp)
    finished = [t for t, st in before_status.items() if st == "TERMINATED"]
    assert finished and len(before_status) < 3 + 1
    assert not (exp / "search" / "summary.json").exists()

    res = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "resuming the search" in res.stdout
    s = _summary(res.stdout)
    assert s["resumed"] is True and s["trials"] == 3
    after_rows = _result_rows(exp)
    assert set(before_status) <= set(after_rows)
    for t in finished:  # finished trials were not run again: same reported epochs, same values
        assert [r["epoch"] for r in after_rows[t]] == [r["epoch"] for r in before_rows[t]]
        assert [r["val_loss"] for r in after_rows[t]] == [r["val_loss"] for r in before_rows[t]]
    for t, rows in after_rows.items():  # no trial repeated an epoch (resumed ones continue from their checkpoint)
        epochs = [r["epoch"] for r in rows]
        assert epochs == sorted(set(epochs)), (t, epochs)
    assert set(_trial_status(exp).values()) == {"TERMINATED"}
    trials = pq.read_table(exp / "search" / "trials.parquet")
    assert trials.num_rows == 3
    from leukray.registry import load_package

    _check_card_matches_trials(load_package(str(registry / "leukray-smoke")).card, trials)


def test_storage_and_registry_on_s3(cluster, smoke_data, monkeypatch):
    from leukray import storage
    from leukray.registry import load_package

    endpoint = cluster["s3_endpoint"]
    make_bucket(endpoint, "tune-test")
    s3_env = dict(S3_CREDS, AWS_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL_S3=endpoint)
    res = submit_job(cluster, ["python", "jobs/tune.py", "--smoke-test", "--data", smoke_data,
                               "--storage-path", "s3://tune-test/experiments", "--registry", "s3://tune-test/registry",
                               "--name", "on-s3", "--epochs", "1", "--num-samples", "2"],
                     working_dir=REPO, runtime_env={"excludes": EXCLUDES, "env_vars": s3_env}, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    s = _summary(res.stdout)
    assert s["package"] == "s3://tune-test/registry/leukray-smoke/v0001"
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    opts = StorageOptions(endpoint_url=endpoint)
    pkg = load_package("s3://tune-test/registry/leukray-smoke", opts)
    fs, _ = storage.filesystem("s3://tune-test", opts)
    with fs.open("tune-test/experiments/on-s3/search/trials.parquet", "rb") as f:
        trials = pq.read_table(f)
    assert trials.num_rows == 2
    _check_card_matches_trials(pkg.card, trials)
    assert fs.exists("tune-test/experiments/on-s3/tuner.pkl")
    assert fs.glob("tune-test/experiments/on-s3/*/checkpoint_*")


def test_smoke_test_makes_its_data_on_a_fresh_clone(tmp_path, monkeypatch):
    """`jobs/tune.py --smoke-test` from a fresh clone: the smoke config's data folder is generated when absent (a
    labelled folder the trainer lists), and an existing one is left as it is."""
    from leukray.data import list_labelled_folder
    from leukray.search import prepare_smoke

    monkeypatch.chdir(tmp_path)
    cfg = load_search_config(SMOKE)
    assert not (tmp_path / cfg.train.data.root).exists()
    prepare_smoke(cfg)
    listing = list_labelled_folder(str(tmp_path / cfg.train.data.root))
    from leukray import CLASSES

    assert sorted(set(listing.labels)) == sorted(CLASSES) and len(listing.paths) >= 4 * 30
    marker = tmp_path / cfg.train.data.root / "kept.txt"
    marker.write_text("x")
    prepare_smoke(cfg)
    assert marker.exists()


@pytest.mark.parametrize("job", ["tune.py", "score.py", "demo.py"])
def test_jobs_use_the_installed_package(job, tmp_path):
    """The entry points import `leukray` as installed (pip install -e . here; Ray's --working-dir on a cluster puts
    the checkout on PYTHONPATH): no sys.path edits, and they start from any working directory."""
    text = (REPO / "jobs" / job).read_text()
    assert "sys.path" not in text
    res = subprocess.run([sys.executable, str(REPO / "jobs" / job), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "usage" in res.stdout, res.stderr[-2000:]

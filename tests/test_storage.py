"""storage.arrow_filesystem reaches the same objects as storage.filesystem, on a moto server and locally."""

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pydantic import SecretStr

from leukray import storage
from leukray.config import StorageOptions


def test_local_paths_match(tmp_path):
    storage.write_bytes(str(tmp_path / "a" / "b.bin"), b"local")
    fs, root = storage.arrow_filesystem(str(tmp_path / "a"))
    assert root == storage.filesystem(str(tmp_path / "a"))[1]
    assert fs.open_input_file(f"{root}/b.bin").read() == b"local"


def test_s3_reads_what_s3fs_wrote(s3):
    endpoint, _client = s3
    opts = StorageOptions(endpoint_url=endpoint)
    storage.write_bytes("s3://lab/p/x.bin", b"remote", opts)
    fs, root = storage.arrow_filesystem("s3://lab/p", opts)
    assert root == "lab/p" and fs.open_input_file("lab/p/x.bin").read() == b"remote"
    # a Parquet dataset written through s3fs is read back by Arrow's client, paths as fsspec names them
    table = pa.table({"n": [1, 2, 3]})
    fsspec_fs, _ = storage.filesystem("s3://lab/p", opts)
    with fsspec_fs.open("lab/p/t.parquet", "wb") as fh:
        pq.write_table(table, fh)
    assert ds.dataset(["lab/p/t.parquet"], filesystem=fs, format="parquet").to_table().equals(table)


def _args(fs) -> dict:
    return fs.__reduce__()[1][0]  # the constructor arguments Arrow pickles the filesystem with


def test_endpoint_credentials_region(monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    opts = StorageOptions(endpoint_url="http://127.0.0.1:9000/", region="eu-west-1", key=SecretStr("AK"),
                          secret=SecretStr("SK"))
    a = _args(storage.arrow_filesystem("s3://b/k", opts)[0])
    assert (a["endpoint_override"], a["scheme"], a["region"]) == ("127.0.0.1:9000", "http", "eu-west-1")
    assert (a["access_key"], a["secret_key"], a["anonymous"]) == ("AK", "SK", False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.lab:9000")  # the environment's endpoint, as s3fs takes it
    a = _args(storage.arrow_filesystem("s3://b/k", StorageOptions(anon=True))[0])
    assert (a["endpoint_override"], a["scheme"], a["anonymous"]) == ("minio.lab:9000", "https", True)

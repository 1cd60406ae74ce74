"""storage.arrow_filesystem reaches the same objects as storage.filesystem, on a moto server and locally; local
files written for Tune appear whole; awkward names (glob characters in keys, a file name in another encoding) are
read as themselves."""

import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pydantic import SecretStr

from leukray import storage
from leukray.config import StorageOptions

from conftest import REPO


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


def test_read_objects_takes_keys_literally(s3):
    """Glob characters in object keys: each key is read as itself, a missing one gives its error in place."""
    endpoint, client = s3
    names = ["f/cell[1].jpg", "f/cell1.jpg", "f/*.jpg", "f/a?.jpg", "f/sp ace #2 é.jpg"]
    for i, name in enumerate(names):
        client.put_object(Bucket="lab", Key=name, Body=f"object {i}".encode())
    fs, _ = storage.filesystem("s3://lab", StorageOptions(endpoint_url=endpoint))
    got = storage.read_objects(fs, [f"lab/{n}" for n in names] + ["lab/f/gone.jpg"])
    assert got[:-1] == [f"object {i}".encode() for i in range(len(names))]
    assert isinstance(got[-1], FileNotFoundError)
    assert storage.read_objects(fs, []) == []


def test_file_names_in_another_encoding_are_listed_and_read(tmp_path):
    """A Latin-1 name on a UTF-8 system: its path is stored escaped (Arrow needs UTF-8) and read back from it, by
    scoring's listing and reader, by a labelled folder's listing and reader, and by read_bytes."""
    import io

    from PIL import Image

    from leukray import archive, data

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 100, 150)).save(buf, "PNG")
    (tmp_path / "Benign").mkdir()
    for name in (b"caf\xe9.png", b"plain.png", b"literal \\udc e.png"):
        (tmp_path / "Benign" / os.fsdecode(name)).write_bytes(buf.getvalue())
    listing, _ = archive.list_inputs(str(tmp_path))
    paths = listing.column("path").to_pylist()
    assert paths == sorted(str(tmp_path / "Benign" / n) for n in ("caf\\udce9.png", "plain.png", "literal \\udc e.png"))
    images, errors = archive.read_decode(paths, listing.column("size").to_pylist(), 16, None, 10**6)
    assert errors == ["", "", ""] and (images == images[1]).all()
    assert storage.read_bytes(paths[0]) == buf.getvalue()
    labelled = data.list_labelled_folder(str(tmp_path))
    assert labelled.paths == ["Benign/caf\\udce9.png", "Benign/literal \\udc e.png", "Benign/plain.png"]
    assert data.read_all(str(tmp_path), labelled.paths) == [buf.getvalue()] * 3
    pa.table({"path": paths})  # valid UTF-8


def test_a_broken_link_in_an_archive_gets_its_error_row(tmp_path):
    """A symbolic link whose target is gone is listed and read as one file's error, named as such; a working link
    is read through."""
    import io

    from PIL import Image

    from leukray import archive

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 100, 150)).save(buf, "PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    os.symlink(tmp_path / "moved-away.png", tmp_path / "c.png")
    listing, other = archive.list_inputs(str(tmp_path))
    paths = listing.column("path").to_pylist()
    assert paths == [str(tmp_path / n) for n in ("a.png", "b.png", "c.png")] and other == {}
    images, errors = archive.read_decode(paths, listing.column("size").to_pylist(), 16, None, 10**6)
    assert errors[:2] == ["", ""] and (images[0] == images[1]).all()
    assert errors[2] == f"cannot read file: broken symbolic link (its target {tmp_path / 'moved-away.png'} does not exist)"


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


def test_tune_filesystem_writes_whole_files(tmp_path):
    fs = storage.tune_filesystem(str(tmp_path))[0]
    target = tmp_path / "state" / "experiment_state.json"
    with fs.open_output_stream(str(target)) as f:
        f.write(b"old")
    assert target.read_bytes() == b"old"

    # a writer killed between opening and closing: the old content stays, whole
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from leukray import storage\n"
        "f = storage.tune_filesystem('.')[0].open_output_stream(sys.argv[1])\n"
        "f.write(b'new, half written'); f.flush(); print('open', flush=True); time.sleep(60)"),
        str(target)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert child.stdout.readline().strip() == "open"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert target.read_bytes() == b"old"

    # directories copied through it (what Tune does after each checkpoint) arrive whole; no part files remain
    src = tmp_path / "staging"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_bytes(b"a" * 100_000)
    (src / "sub" / "b.pkl").write_bytes(b"b")
    pafs.copy_files(str(src), str(tmp_path / "copy"), destination_filesystem=fs)
    got = sorted(p.relative_to(tmp_path / "copy").as_posix() for p in (tmp_path / "copy").rglob("*"))
    assert got == ["a.json", "sub", "sub/b.pkl"]
    assert (tmp_path / "copy" / "a.json").read_bytes() == b"a" * 100_000

"""One way to reach local folders and object storage (s3:// on AWS or any S3-compatible endpoint).

Everything that reads or writes a path goes through `filesystem()`, so a local run and a cluster run on S3
differ only in the URI.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import uuid
from typing import Any

import fsspec
from pyarrow import PythonFile
from pyarrow.fs import FSSpecHandler, PyFileSystem

from .config import StorageOptions

REMOTE_SCHEMES = ("s3://", "s3a://")


class StorageError(OSError):
    """A location cannot be reached or does not exist; the message names the URI."""


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def endpoint_url(options: StorageOptions | None = None) -> str | None:
    if options is not None and options.endpoint_url:
        return options.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_kwargs(options: StorageOptions | None = None) -> dict[str, Any]:
    """s3fs constructor arguments; the only place credentials from config are unwrapped."""
    options = options or StorageOptions()
    kw: dict[str, Any] = {"anon": options.anon}
    client_kwargs: dict[str, Any] = {}
    ep = endpoint_url(options)
    if ep:
        kw["endpoint_url"] = ep
    region = options.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    if options.key is not None:
        kw["key"] = options.key.get_secret_value()
    if options.secret is not None:
        kw["secret"] = options.secret.get_secret_value()
    if client_kwargs:
        kw["client_kwargs"] = client_kwargs
    return kw


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or s3:// URI."""
    if is_remote(uri):
        import s3fs

        fs = s3fs.S3FileSystem(**s3_kwargs(options))
        return fs, uri.split("://", 1)[1].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))


def arrow_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or s3:// URI: Arrow's own C++ filesystems.

    For pyarrow datasets that another engine scans (DuckDB): an fsspec filesystem there is called back through
    Python from Arrow's IO threads, and with DuckDB holding the GIL on the scanning thread that can deadlock
    (seen here: a query over s3:// hung forever under CPU load). Arrow's S3 client needs no GIL."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), filesystem(uri, options)[1]
    kw = s3_kwargs(options)
    args: dict[str, Any] = {"anonymous": bool(kw.get("anon"))}
    endpoint = kw.get("endpoint_url")
    if endpoint:
        scheme, sep, rest = endpoint.partition("://")
        args["endpoint_override"] = rest.rstrip("/") if sep else endpoint.rstrip("/")
        args["scheme"] = scheme if sep else "https"
    region = kw.get("client_kwargs", {}).get("region_name")
    if region:
        args["region"] = region
    if "key" in kw:
        args["access_key"] = kw["key"]
    if "secret" in kw:
        args["secret_key"] = kw["secret"]
    return pafs.S3FileSystem(**args), uri.split("://", 1)[1].rstrip("/")


class _RenamedOnClose(io.FileIO):
    """A file written under a hidden name beside its target and renamed onto it when closed (dropped if a write
    failed), so readers see the old content or the new, never a part."""

    def __init__(self, path: str):
        folder, name = os.path.split(path)
        os.makedirs(folder or ".", exist_ok=True)
        self._target, self._failed = path, False
        super().__init__(os.path.join(folder, f".{name}.{uuid.uuid4().hex}.part"), "xb")

    def write(self, b) -> int:
        try:
            return super().write(b)
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self._failed:
            os.unlink(self.name)
        else:
            os.replace(self.name, self._target)


class _WholeFileHandler(FSSpecHandler):
    def open_output_stream(self, path, metadata):
        return PythonFile(_RenamedOnClose(path), mode="w")


def tune_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[PyFileSystem, str]:
    """(pyarrow filesystem, path inside it) for Ray Tune's storage: s3:// through s3fs (the credentials and
    endpoint everything else uses), local folders with new files that appear whole or not at all.

    Why whole files: Tune copies its experiment and searcher state into the storage folder after every
    checkpoint; with plain local writes a driver killed during the copy leaves a truncated state file, and the
    search can then never be resumed. Object stores write whole objects already."""
    fs, path = filesystem(uri, options)
    return PyFileSystem(FSSpecHandler(fs) if is_remote(uri) else _WholeFileHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def check_bucket(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> None:
    """Fail early with 'bucket does not exist' rather than a bare 404 deep inside a job."""
    if not hasattr(fs, "s3"):
        return
    bucket = path.split("/", 1)[0]
    try:
        exists = fs.exists(bucket)
    except PermissionError as err:
        raise StorageError(f"access denied to bucket '{bucket}' ({uri}): {err}") from None
    if not exists:
        raise StorageError(f"bucket '{bucket}' does not exist (from {uri}; endpoint {fs.client_kwargs.get('endpoint_url') or getattr(fs, 'endpoint_url', None) or 'AWS'})")


_ESCAPED_BYTE = re.compile(r"\\udc([89a-f][0-9a-f])")


def path_text(path: str) -> str:
    """A local path as text a table can hold. Bytes of a file name that are not UTF-8 (a share written in another
    encoding) reach Python as lone surrogates, which Arrow and Parquet refuse; they are written as Python escapes
    them, `\\udcXX`, which `os_path` turns back, so such a file is still listed, read and scored."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")  # a UTF-8 path comes back as it was


def os_path(text: str) -> str:
    """The local path `path_text` wrote as `text`."""
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m[1], 16)), text)


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    path = path if is_remote(uri) else os_path(path)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        check_bucket(fs, path, uri)
        raise StorageError(f"not found: {uri}") from None


def read_objects(fs: Any, keys: list[str]) -> list[bytes | BaseException]:
    """Whole objects of an object-store filesystem, fetched concurrently, in the order of `keys`; a key that cannot
    be read gives its exception in its place. Keys are taken literally: `fs.cat` would expand `[`, `*`, `?` in a key
    as a glob pattern, so `cell[1].jpg` would be missed and `*.jpg` would fetch a whole folder."""
    return fs.cat_ranges(keys, None, None, on_error="return") if keys else []


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    fs, path = filesystem(uri, options)
    check_bucket(fs, path, uri)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_json(uri: str, options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(uri, options))


def write_json(uri: str, obj: Any, options: StorageOptions | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=False, default=str).encode(), options)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    return fs.exists(path)


def upload_dir(local_dir: str, uri: str, options: StorageOptions | None = None) -> None:
    """Copy a local folder to `uri` (a no-op copy when `uri` is the same local folder)."""
    fs, path = filesystem(uri, options)
    if not is_remote(uri):
        if os.path.abspath(local_dir) == path:
            return
        fs.makedirs(path, exist_ok=True)
    else:
        check_bucket(fs, path, uri)
    for root, _dirs, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        for name in files:
            src = os.path.join(root, name)
            dst = posixpath.join(path, rel, name) if rel != "." else posixpath.join(path, name)
            if not is_remote(uri):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
            fs.put_file(src, dst)

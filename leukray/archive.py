"""The image archive a scoring run reads: list its image files (local folder or s3:// prefix), pick the new or
changed ones, and read + decode a batch of them with one error message per bad file (never an exception)."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .config import StorageOptions
from .images import ImageDecodeError, decode_image, is_image_name

LISTING_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("source_version", pa.string())])


def _extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return os.path.splitext(base)[1].lower() or "(none)"


def list_inputs(uri: str, opts: StorageOptions | None = None) -> tuple[pa.Table, dict[str, int]]:
    """Image files under `uri` (recursive): path (full URI), size, source_version (ETag or mtime ns), sorted; and
    how many other files were passed over, by extension, so a run can say what it did not read."""
    fs, root = storage.filesystem(uri, opts)
    remote = storage.is_remote(uri)
    rows: list[tuple[str, int, str]] = []
    other: Counter[str] = Counter()
    if remote:
        storage.check_bucket(fs, root, uri)
        fs.invalidate_cache()
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            found = {}
        except PermissionError as err:
            raise storage.StorageError(f"access denied listing {uri}: {err}") from None
        for key, info in found.items():
            if info.get("type", "file") != "file":
                continue
            if not is_image_name(key):
                other[_extension(key)] += 1
                continue
            version = str(info.get("ETag") or info.get("VersionId") or info.get("LastModified") or "").strip('"')
            rows.append(("s3://" + key, int(info.get("size") or 0), version))
    else:
        if not os.path.exists(root):
            raise storage.StorageError(f"input not found: {uri} (expected a folder of images)")
        if os.path.isfile(root):
            walk = [(os.path.dirname(root), [], [os.path.basename(root)])]
        else:
            walk = os.walk(root)
        for dirpath, dirnames, filenames in walk:
            dirnames.sort()
            for name in filenames:
                if not is_image_name(name):
                    other[_extension(name)] += 1
                    continue
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except OSError:  # a broken link: listed, so that it gets its error row
                    try:
                        st = os.lstat(p)
                    except OSError:  # gone since os.walk saw it
                        continue
                rows.append((storage.path_text(p), int(st.st_size), str(st.st_mtime_ns)))
    rows.sort()
    listing = pa.table({"path": [r[0] for r in rows], "size": [r[1] for r in rows],
                        "source_version": [r[2] for r in rows]}, schema=LISTING_SCHEMA)
    return listing, dict(sorted(other.items()))


def select_new(listing: pa.Table, scored: pa.Table) -> pa.Table:
    """Files of `listing` whose (path, source_version) is not among `scored` (new or changed files)."""
    if scored.num_rows == 0 or listing.num_rows == 0:
        return listing
    keys = scored.group_by(["path", "source_version"]).aggregate([])
    new = listing.join(keys, keys=["path", "source_version"], join_type="left anti")
    return new.sort_by("path").select(listing.column_names)


_FS_CACHE: dict[Any, Any] = {}


def _fs_for(remote: bool, opts: StorageOptions | None):
    key = (remote, opts.model_dump_json() if opts else None)
    if key not in _FS_CACHE:
        _FS_CACHE[key] = storage.filesystem("s3://x" if remote else "/", opts)[0]
    return _FS_CACHE[key]


def read_decode(paths: list[str], sizes: list[int], image_size: int, opts: StorageOptions | None,
                max_file_bytes: int) -> tuple[np.ndarray, list[str]]:
    """Files → `(images (N, S, S, 3) uint8, errors)` with errors[i] == "" when file i decoded. Never raises for a
    bad file: a read or decode failure becomes that file's error message (and later its error row)."""
    n, s = len(paths), image_size
    images = np.zeros((n, s, s, 3), dtype=np.uint8)
    errors = [""] * n
    fetch = []
    for i, p in enumerate(paths):
        if int(sizes[i]) > max_file_bytes:
            errors[i] = f"file too large: {int(sizes[i])} bytes exceeds max_file_bytes={max_file_bytes}"
        else:
            fetch.append(i)
    data: dict[str, Any] = {}
    remote_idx = [i for i in fetch if storage.is_remote(paths[i])]
    local_idx = [i for i in fetch if not storage.is_remote(paths[i])]
    if remote_idx:  # s3fs fetches a list of keys concurrently
        fs = _fs_for(True, opts)
        keys = [paths[i].split("://", 1)[1] for i in remote_idx]
        try:
            got = storage.read_objects(fs, keys)
        except Exception as err:  # noqa: BLE001 - the whole request failed: every file gets the reason
            got = [err] * len(keys)
        for i, blob in zip(remote_idx, got):
            data[paths[i]] = blob
    for i in local_idx:
        try:
            with open(storage.os_path(paths[i]), "rb") as f:
                data[paths[i]] = f.read(max_file_bytes + 1)
        except OSError as err:
            data[paths[i]] = err
    for i in fetch:
        raw = data[paths[i]]
        if isinstance(raw, BaseException):
            link = "" if storage.is_remote(paths[i]) else storage.os_path(paths[i])
            if isinstance(raw, FileNotFoundError) and link and os.path.islink(link):
                errors[i] = f"cannot read file: broken symbolic link (its target {os.readlink(link)} does not exist)"
            elif isinstance(raw, FileNotFoundError):
                errors[i] = "cannot read file: it vanished after listing (not found)"
            else:
                errors[i] = f"cannot read file: {type(raw).__name__}: {raw}"
            continue
        if len(raw) > max_file_bytes:
            errors[i] = f"file too large: more than max_file_bytes={max_file_bytes} bytes"
            continue
        try:
            images[i] = decode_image(raw, s)  # the one preprocessing path (same as training)
        except ImageDecodeError as err:
            errors[i] = str(err)
        except Exception as err:  # noqa: BLE001 - anything else a decoder throws is still one file's problem
            errors[i] = f"cannot decode image: {type(err).__name__}: {err}"
    return images, errors


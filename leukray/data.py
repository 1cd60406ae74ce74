"""Labelled image folders (local or s3://): listing, class-name aliases, reading, decoding once into a cache.

A dataset is a root with one sub-folder per class. The public dataset's folder names (Benign/Early/Pre/Pro and
the Kaggle "[Malignant] early Pre-B" style) map onto the canonical `leukray.CLASSES`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import CLASSES, storage
from .config import StorageOptions
from .images import IMAGE_TYPES, ImageDecodeError, decode_image, is_image_name


class DataError(ValueError):
    """The dataset is unusable as given; the message names the folder or files at fault."""


_ALIASES = {
    "benign": "Benign", "normal": "Benign", "hematogone": "Benign", "hematogones": "Benign",
    "early": "Early Pre-B", "earlypreb": "Early Pre-B", "earlyprebcell": "Early Pre-B",
    "pre": "Pre-B", "preb": "Pre-B",
    "pro": "Pro-B", "prob": "Pro-B",
}


def canonical_class(folder: str) -> str | None:
    """Folder name → canonical class, or None when it is not a known alias."""
    key = re.sub(r"\[?malignant\]?", "", folder.lower())
    key = re.sub(r"(all|cell|cells)$", "", re.sub(r"[^a-z]", "", key))
    return _ALIASES.get(key)


@dataclass
class Listing:
    root: str
    paths: list[str]
    """Paths relative to root, '/'-separated, sorted."""
    labels: list[str]


def list_labelled_folder(root: str, storage_options: StorageOptions | None = None) -> Listing:
    """Every image under class folders of `root`. Unknown folders and stray files are errors, named."""
    fs, base = storage.filesystem(root, storage_options)
    storage.check_bucket(fs, base, root)
    if not fs.exists(base):
        raise DataError(f"dataset folder not found: {root}")
    entries = fs.ls(base, detail=True)
    folders = sorted(e["name"] for e in entries if e["type"] == "directory")
    loose = sorted(os.path.basename(e["name"]) for e in entries if e["type"] != "directory" and is_image_name(e["name"]))
    unknown = [os.path.basename(f) for f in folders if canonical_class(os.path.basename(f)) is None
               and not os.path.basename(f).startswith(".")]
    if unknown:
        raise DataError(
            f"{root}: unknown class folder(s) {unknown}; expected one folder per class with names like "
            f"{', '.join(CLASSES)} (or the dataset's Benign/Early/Pre/Pro)")
    if loose:
        raise DataError(f"{root}: images outside class folders (cannot be labelled): {loose[:10]}")
    paths, labels, skipped = [], [], []
    for folder in folders:
        name = os.path.basename(folder)
        if name.startswith("."):
            continue
        cls = canonical_class(name)
        for f in sorted(fs.find(folder)):
            rel = storage.path_text(f[len(base):].lstrip("/"))
            if is_image_name(f):
                paths.append(rel)
                labels.append(cls)
            elif not os.path.basename(f).startswith("."):
                skipped.append(rel)
    if skipped:
        print(f"[leukray] warning: {len(skipped)} non-image file(s) ignored in {root}: {skipped[:10]}", file=sys.stderr)
    if not paths:
        raise DataError(f"{root}: no images found (expected class folders containing "
                        f"{IMAGE_TYPES} files)")
    counts = {c: labels.count(c) for c in CLASSES}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        print(f"[leukray] warning: no images for class(es) {empty} in {root}", file=sys.stderr)
    return Listing(root, paths, labels)


def read_all(root: str, rel_paths: list[str], storage_options: StorageOptions | None = None,
             threads: int = 16) -> list[bytes]:
    fs, base = storage.filesystem(root, storage_options)
    if storage.is_remote(root):
        full = [f"{base}/{p}" for p in rel_paths]
        blobs = storage.read_objects(fs, full)
        for p, b in zip(rel_paths, blobs):
            if isinstance(b, BaseException):
                raise DataError(f"cannot read {root}/{p}: {b}")
        return blobs

    def read(p: str) -> bytes:
        with open(os.path.join(base, storage.os_path(p)), "rb") as fh:
            return fh.read()

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(read, rel_paths))


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_all(blobs: list[bytes], rel_paths: list[str], image_size: int,
               threads: int | None = None) -> tuple[np.ndarray, dict[str, str]]:
    """Decode every image (N, S, S, 3) uint8, and the unreadable files by name with the reason: their rows stay
    black and the caller leaves them out, so one corrupt file in a dataset costs no other image."""
    out = np.zeros((len(blobs), image_size, image_size, 3), dtype=np.uint8)
    unreadable: dict[str, str] = {}

    def work(i: int) -> None:
        try:
            out[i] = decode_image(blobs[i], image_size)
        except ImageDecodeError as err:
            unreadable[rel_paths[i]] = str(err)

    with ThreadPoolExecutor(threads or min(8, (os.cpu_count() or 2) * 2)) as pool:
        list(pool.map(work, range(len(blobs))))
    return out, dict(sorted(unreadable.items()))


def warn_unreadable(root: str, unreadable: dict[str, str]) -> None:
    if unreadable:
        shown = "\n  ".join(f"{p}: {why}" for p, why in list(unreadable.items())[:20])
        more = f"\n  … and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
        print(f"[leukray] warning: {len(unreadable)} unreadable image(s) in {root} left out:\n  {shown}{more}",
              file=sys.stderr)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LEUKRAY_CACHE", Path.home() / ".cache" / "leukray"))


def cached_decode(root: str, rel_paths: list[str], hashes: list[str], image_size: int,
                  storage_options: StorageOptions | None = None, cache_dir: Path | None = None,
                  blobs: dict[str, bytes] | None = None) -> tuple[np.ndarray, dict[str, str]]:
    """Decoded images and the unreadable files (`decode_all`), from a local .npy cache keyed by content hashes and
    size (decode once, reuse in every epoch, trial and run); the cache is memory-mapped so concurrent trials share
    the page cache, and the unreadable files are kept beside it."""
    key = hashlib.sha256(("\n".join(hashes) + f"\n{image_size}").encode()).hexdigest()[:20]
    cache = (cache_dir or default_cache_dir()) / f"images-{key}-{image_size}px.npy"
    bad = cache.with_suffix(".unreadable.json")
    if cache.exists():
        return np.load(cache, mmap_mode="r"), (json.loads(bad.read_text()) if bad.exists() else {})
    data = [blobs[p] for p in rel_paths] if blobs is not None else read_all(root, rel_paths, storage_options)
    arr, unreadable = decode_all(data, rel_paths, image_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    if unreadable:  # written first: a cache file without it means every image decoded
        tmp_bad = bad.with_suffix(f".{os.getpid()}.tmp")
        tmp_bad.write_text(json.dumps(unreadable))
        os.replace(tmp_bad, bad)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, cache)
    return np.load(cache, mmap_mode="r"), unreadable


def read_images_folder(root: str, image_size: int,
                       storage_options: StorageOptions | None = None) -> tuple[np.ndarray, list[str]]:
    """Every image under `root` (any depth, no labels), decoded (N, S, S, 3) uint8, and the unreadable ones by
    name: an unlabelled folder (e.g. `leukray evaluate --ood`) loses no image to another's bad file."""
    fs, base = storage.filesystem(root, storage_options)
    storage.check_bucket(fs, base, root)
    if not fs.exists(base):
        raise DataError(f"image folder not found: {root}")
    rel = sorted(storage.path_text(f[len(base):].lstrip("/")) for f in fs.find(base) if is_image_name(f))
    blobs = read_all(root, rel, storage_options)
    images, unreadable = decode_all(blobs, rel, image_size)
    warn_unreadable(root, unreadable)
    keep = [i for i, p in enumerate(rel) if p not in unreadable]
    return images[keep], [f"{p}: {why}" for p, why in unreadable.items()]

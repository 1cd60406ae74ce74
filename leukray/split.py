"""Where data is split: deterministic, stratified train/val/test with duplicate-aware groups.

The public dataset holds byte-identical pairs and near-copies (the same cell photographed twice). A per-image
random split puts one copy in train and the other in test and flatters test accuracy, so images are first grouped
— same content hash, or grayscale thumbnails correlating above a threshold within a class — and whole groups are
assigned to splits. The result is a Parquet manifest (path, hash, group, class, split) that later runs reuse.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import CLASSES, storage
from .config import StorageOptions, StrictModel
from .images import ImageDecodeError, decode_image

SPLITS = ("train", "val", "test")
MANIFEST_SCHEMA = pa.schema([
    ("path", pa.string()), ("hash", pa.string()), ("group", pa.string()),
    ("class", pa.string()), ("split", pa.string()),
])


class SplitConfig(StrictModel):
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int = 0
    near_duplicate_threshold: float = 0.97
    """Pearson correlation of 24x24 grayscale thumbnails above which two images of a class are one group."""
    manifest: str | None = None
    """Reuse (or create) the split manifest at this path/URI; default: <out>/split.parquet."""


def thumbnails(blobs: list[bytes], size: int = 24) -> np.ndarray:
    """(N, size*size) standardised grayscale thumbnails; rows of undecodable files are zero (never grouped)."""
    out = np.zeros((len(blobs), size * size), dtype=np.float32)
    for i, b in enumerate(blobs):
        try:
            g = decode_image(b, size).astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        except ImageDecodeError:
            continue
        g = g.ravel() - g.mean()
        n = np.linalg.norm(g)
        out[i] = g / n if n > 0 else 0
    return out


def group_duplicates(hashes: list[str], thumbs: np.ndarray, labels: list[str], threshold: float) -> list[str]:
    """Group id per image (the smallest content hash in its group, so ids do not depend on file order)."""
    n = len(hashes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h in first:
            union(first[h], i)
        else:
            first[h] = i
    labels_arr = np.asarray(labels)
    for cls in sorted(set(labels)):
        idx = np.flatnonzero(labels_arr == cls)
        if len(idx) < 2:
            continue
        corr = thumbs[idx] @ thumbs[idx].T
        ii, jj = np.nonzero(np.triu(corr > threshold, k=1))
        for a, b in zip(ii, jj):
            union(int(idx[a]), int(idx[b]))
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    group = [""] * n
    for root, ms in members.items():
        gid = min(hashes[m] for m in ms)[:16]
        for m in ms:
            group[m] = gid
    return group


def assign_splits(groups: list[str], labels: list[str], cfg: SplitConfig) -> list[str]:
    """Per class, shuffle groups with the seed and give each to the split furthest below its target."""
    fractions = np.array([cfg.train, cfg.val, cfg.test], dtype=np.float64)
    if np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions train/val/test = {fractions.tolist()} must be >= 0 and sum to 1")
    split = [""] * len(groups)
    for k, cls in enumerate(sorted(set(labels))):
        by_group: dict[str, list[int]] = {}
        for i, (g, c) in enumerate(zip(groups, labels)):
            if c == cls:
                by_group.setdefault(g, []).append(i)
        order = sorted(by_group)
        rng = np.random.default_rng([cfg.seed, CLASSES.index(cls) if cls in CLASSES else k])
        order = [order[i] for i in rng.permutation(len(order))]
        target = fractions * sum(len(v) for v in by_group.values())
        counts = np.zeros(3)
        for g in order:
            s = int(np.argmax(target - counts))
            counts[s] += len(by_group[g])
            for i in by_group[g]:
                split[i] = SPLITS[s]
    return split


def make_manifest(paths: list[str], labels: list[str], hashes: list[str], blobs: list[bytes],
                  cfg: SplitConfig) -> pa.Table:
    groups = group_duplicates(hashes, thumbnails(blobs), labels, cfg.near_duplicate_threshold)
    splits = assign_splits(groups, labels, cfg)
    return pa.table({"path": paths, "hash": hashes, "group": groups, "class": labels, "split": splits},
                    schema=MANIFEST_SCHEMA)


def manifest_hash(table: pa.Table) -> str:
    """Identifies a split: the same files with the same assignment give the same hash."""
    rows = sorted(zip(table["path"].to_pylist(), table["hash"].to_pylist(), table["split"].to_pylist()))
    return hashlib.sha256("\n".join("\t".join(r) for r in rows).encode()).hexdigest()[:16]


def save_manifest(table: pa.Table, uri: str, storage_options: StorageOptions | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue(), storage_options)


def load_manifest(uri: str, storage_options: StorageOptions | None = None) -> pa.Table:
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri, storage_options)))
    missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{uri}: not a split manifest (missing columns {sorted(missing)})")
    return table.select(MANIFEST_SCHEMA.names)


def summarize(table: pa.Table) -> dict:
    """Counts per split and class, and how many duplicate groups there are (for logs and the model card)."""
    out: dict = {}
    for s in SPLITS:
        cls = [c for c, sp in zip(table["class"].to_pylist(), table["split"].to_pylist()) if sp == s]
        out[s] = {c: cls.count(c) for c in CLASSES if c in cls} | {"total": len(cls)}
    groups = table["group"].to_pylist()
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    out["duplicate_groups"] = sum(1 for v in sizes.values() if v > 1)
    out["images_in_duplicate_groups"] = sum(v for v in sizes.values() if v > 1)
    return out

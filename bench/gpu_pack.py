"""Pack the Taleqani images, the ImageNet MobileNetV2 weights and the missing wheels for one lent GPU machine.

The device tool carries at most 64 MiB per call, and the images (61 MB) plus the weights (9 MB) do not fit as
they are. Both are packed losslessly: each JPEG is transcoded to progressive with `jpegtran` (the same DCT
coefficients, so the decoded pixels are identical: checked here for every image, abort otherwise) and exact
duplicates are stored once; the weights are byte-shuffled and xz-compressed. The split manifest travels with
the hashes of the carried bytes (same paths, splits and groups). `bench/gpu_recipes.py` unpacks on the device.
Without jpegtran (Debian: libjpeg-turbo-progs) the images travel as they are: 61 MB, too much beside the weights.

    python bench/gpu_pack.py --data ../shared/data/taleqani-all --manifest runs/taleqani-128/split.parquet \
        --jpegtran /path/to/jpegtran --out .gpu-carry
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from leukray.data import list_labelled_folder
from leukray.model import load_backbone_weights
from leukray.split import load_manifest, save_manifest

WHEELS = ["pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
          "typing-extensions==4.16.0"]


def transcode(jpegtran: str | None, rel: str, data: bytes) -> bytes:
    """Lossless: progressive JPEG of the same coefficients, or the bytes as they are."""
    if jpegtran is None or not rel.lower().endswith((".jpg", ".jpeg")):
        return data
    packed = subprocess.run([jpegtran, "-copy", "none", "-progressive"], input=data, capture_output=True,
                            check=True).stdout
    pixels = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in (data, packed)]
    if not np.array_equal(*pixels):
        raise SystemExit(f"{rel}: transcoded pixels differ; not packing")
    return packed


def pack_weights(out: str) -> int:
    os.environ.setdefault("LEUKRAY_OFFLINE", "1")
    feats, source = load_backbone_weights("imagenet")
    meta, parts = [], []
    for k, v in feats.items():
        a = v.numpy()
        meta.append({"key": "features." + k, "dtype": str(a.dtype), "shape": list(a.shape)})
        parts.append(np.ascontiguousarray(a).view(np.uint8).reshape(-1, a.dtype.itemsize).T.ravel())
    blob = lzma.compress(np.concatenate(parts).tobytes(), preset=9 | lzma.PRESET_EXTREME)
    with open(os.path.join(out, "weights.xz"), "wb") as fh:
        fh.write(blob)
    with open(os.path.join(out, "weights.json"), "w") as fh:
        json.dump({"source": source, "tensors": meta}, fh)
    return len(blob)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--manifest", required=True, help="split manifest (Parquet); made here if it does not exist")
    ap.add_argument("--jpegtran", default=shutil.which("jpegtran"), help="default: jpegtran on PATH")
    ap.add_argument("--out", default=".gpu-carry")
    ap.add_argument("--no-wheels", dest="wheels", action="store_false", help="do not download the pydantic wheels")
    a = ap.parse_args()
    if not a.jpegtran:
        print("warning: jpegtran not found (libjpeg-turbo-progs): images travel as they are", file=sys.stderr)
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(os.path.join(a.out, "images"))
    listing = list_labelled_folder(a.data)

    def one(rel: str) -> tuple[str, str]:
        with open(os.path.join(a.data, rel), "rb") as fh:
            original = fh.read()
        packed = transcode(a.jpegtran, rel, original)
        digest = hashlib.sha256(packed).hexdigest()
        path = os.path.join(a.out, "images", digest + ".jpg")
        if not os.path.exists(path):
            with open(path, "wb") as fh:
                fh.write(packed)
        return rel, digest

    with ThreadPoolExecutor(8) as pool:
        index = dict(pool.map(one, listing.paths))
    with open(os.path.join(a.out, "index.json"), "w") as fh:
        json.dump(index, fh)
    if not os.path.exists(a.manifest):  # leukray's seeded split, as `leukray train` would make it
        from leukray.config import parse_config
        from leukray.train import TrainConfig, prepare_data

        prepare_data(parse_config(TrainConfig, {"data": {"root": a.data}, "split": {"manifest": a.manifest},
                                                "image_size": 32}))
    table = load_manifest(a.manifest)
    missing = set(table["path"].to_pylist()) ^ set(index)
    if missing:
        sys.exit(f"{a.manifest} does not match {a.data}: {sorted(missing)[:3]}")
    hashes = [index[p] for p in table["path"].to_pylist()]
    table = table.set_column(table.schema.get_field_index("hash"), "hash", pc.cast(hashes, table.schema.field("hash").type))
    save_manifest(table, os.path.join(a.out, "split.parquet"))
    wsize = pack_weights(a.out)
    if a.wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                        "--platform", "manylinux2014_x86_64", "-d", os.path.join(a.out, "wheels"), *WHEELS],
                       check=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(a.out) for f in fs)
    print(json.dumps({"images": len(index), "unique_files": len(set(index.values())), "weights_xz_bytes": wsize,
                      "total_bytes": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

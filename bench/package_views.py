#!/usr/bin/env python
"""The 8-view pass `leukray train` runs after its epochs (the guard's reference: every training image and its colour
copy, averaged over the 8 flips/rotations; the cascade's fit; the test split), with PyTorch and with what training
now packages with (`leukray.train.packaging_model`: the ONNX graph under OpenVINO fp32 on a CPU), on N images of a
folder. Prints one JSON object: images/s (each image = 8 views) for both, the speed-up, the largest difference
of their outputs (logits, features, colour signature), and the estimated time of the reference of
`--reference-images` images (2 × the training split: one colour copy each).

    .venv/bin/python bench/package_views.py --model runs/taleqani --data ../shared/data/taleqani-all [--n 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from leukray.config import parse_config  # noqa: E402
from leukray.data import list_labelled_folder  # noqa: E402
from leukray.images import decode_image  # noqa: E402
from leukray.inference import TorchModel, default_threads  # noqa: E402
from leukray.registry import load_package  # noqa: E402
from leukray.train import TrainConfig, packaging_model  # noqa: E402
from leukray.tta import view_ids  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a model package folder")
    ap.add_argument("--data", required=True, help="labelled image folder")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--reference-images", type=int, default=2 * 2212)
    a = ap.parse_args()
    pkg = load_package(a.model)
    size = int(pkg.card["preprocessing"]["image_size"])
    listing = list_labelled_folder(a.data)
    paths = listing.paths[:: max(1, len(listing.paths) // a.n)][: a.n]
    images = np.stack([decode_image(Path(a.data, p).read_bytes(), size) for p in paths])
    torch.set_num_threads(default_threads())
    cfg = parse_config(TrainConfig, {"image_size": size})
    ids = view_ids("dihedral8")
    t = time.perf_counter()
    packaged = packaging_model(pkg.model, cfg)
    setup_s = time.perf_counter() - t
    rates, outs = {}, {}
    plain = TorchModel(pkg.model, torch.device("cpu"), cfg.eval_batch_size, channels_last=cfg.channels_last)
    for name, model in (("torch", plain), ("packaging", packaged)):
        model.mean_views(images[:8], ids)  # warm-up
        t = time.perf_counter()
        outs[name] = model.mean_views(images, ids)
        rates[name] = len(images) / (time.perf_counter() - t)
    print(json.dumps({
        "images": len(images), "views": len(ids), "image_size": size, "threads": default_threads(),
        "packaging_backend": type(packaged).__name__, "packaging_setup_s": round(setup_s, 2),
        "torch_ips": round(rates["torch"], 2), "packaging_ips": round(rates["packaging"], 2),
        "speedup": round(rates["packaging"] / rates["torch"], 2),
        "max_abs_diff": float(np.abs(outs["torch"] - outs["packaging"]).max()),
        "reference_images": a.reference_images,
        "reference_torch_s": round(a.reference_images / rates["torch"], 1),
        "reference_packaging_s": round(a.reference_images / rates["packaging"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Scoring on a GPU machine: end to end against the model alone, in one run. Prints one JSON object.

  score_ips         leukray.score.run end to end on N generated 224 px JPEG smears (listing, decode, model, the
                    results table's files and commits) with the cluster's layout (`decode`: auto = CPU decode tasks
                    over every CPU when the node has a GPU), per decode layout in --layouts
  model_only_ips    the package's torch model alone on pre-decoded images already on the device (bf16 autocast,
                    channels_last on CUDA), `--batch-size` images per call: the ceiling end to end can reach
  decode_ips_per_core  read + decode of the same files on one core (what the decode tasks share out)

Runs on a CPU too (small --n: the test suite does), where `device` says cpu and the numbers mean little.

    .venv/bin/python bench/gpu_score.py [--n 20000] [--batch-size 1024] [--model PKG] [--layouts auto,actor]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def model_only(package_dir: str, files: list[Path], batch_size: int, seconds: float) -> dict:
    import numpy as np
    import torch

    from leukray import registry
    from leukray.images import decode_image
    from leukray.inference import TorchModel

    pkg = registry.load_package(package_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = np.stack([decode_image(p.read_bytes(), pkg.image_size) for p in files[:batch_size]])
    x = np.concatenate([x] * (batch_size // len(x) + 1))[:batch_size]
    model = TorchModel(pkg.model, device, batch_size)
    model(x)  # warm-up (cuDNN autotune, allocations)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds or n == 0:
        model(x)
        n += len(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"model_only_ips": round(n / (time.perf_counter() - t), 1), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=1024, help="images per GPU model call (gpu_batch_size)")
    ap.add_argument("--model", help="a package (default: an untrained 224 px MobileNetV2 package)")
    ap.add_argument("--layouts", default="auto", help="decode layouts to run end to end (auto, actor, tasks)")
    ap.add_argument("--seconds", type=float, default=10.0, help="model-only measuring time")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "leukray-bench-gpu"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra ScoreConfig keys")
    args = ap.parse_args()

    import yaml
    from score_throughput import make_images

    from leukray.archive import read_decode
    from leukray.score import ScoreConfig, init_ray, run
    from leukray.smoke import untrained_package

    work = Path(args.workdir)
    files = make_images(work / "data", args.n)
    pkg = args.model or untrained_package(str(work / "pkg"), 224)
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    result: dict = {"images": len(files), "batch_size": args.batch_size, "cpus": os.cpu_count(),
                    "model": args.model or "untrained 224 px"}
    t = time.perf_counter()
    sample = files[: min(len(files), 256)]
    read_decode([str(p) for p in sample], [p.stat().st_size for p in sample], 224, None, 2**28)
    result["decode_ips_per_core"] = round(len(sample) / (time.perf_counter() - t), 1)
    result.update(model_only(pkg, files, args.batch_size, args.seconds))
    init_ray(ScoreConfig())
    for layout in [s for s in args.layouts.split(",") if s]:
        out = work / f"out-{layout}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = ScoreConfig(input=str(work / "data"), output=str(out), model=pkg, gpu_batch_size=args.batch_size,
                          decode=layout, **extra)
        t = time.perf_counter()
        m = run(cfg)
        wall = time.perf_counter() - t
        ips = (m["counts"]["scored"] + m["counts"]["errors"]) / wall
        result[f"score_ips_{layout}"] = round(ips, 1)
        result[f"execution_{layout}"] = m["execution"]
        result[f"end_to_end_vs_model_{layout}"] = round(ips / result["model_only_ips"], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

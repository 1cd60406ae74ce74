"""Fixtures for `jobs/score.py --smoke-test` and the throughput benchmarks: an untrained model package and a small
synthetic archive with one bad file."""

from __future__ import annotations

import datetime as dt
import os
import sys

from . import CLASSES, storage
from .score_config import ScoreConfig

CARD, LATEST = "model_card.json", "LATEST"


def log(msg: str) -> None:
    print(f"[leukray score] {msg}", file=sys.stderr, flush=True)


def untrained_package(out_dir: str, image_size: int, name: str = "leukray-smoke", version: str = "v0001",
                      temperature: float = 1.0, seed: int = 0) -> str:
    """A random-weight MobileNetV2 package (smoke tests, throughput benchmarks): weights, ONNX, card."""
    import torch

    from . import registry
    from .model import ModelConfig, build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(weights="none", dropout=0.0), num_classes=len(CLASSES), verbose=False)
    card = {"name": name, "version": version, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "classes": list(CLASSES), "architecture": {"arch": "mobilenet_v2", "dropout": 0.0, "head_width": 128},
            "preprocessing": {"image_size": image_size, "input": "uint8 RGB NCHW, rescaled in-model",
                              "decoder": "leukray.images.decode_image"},
            "temperature": temperature, "metrics": {}, "class_counts": {}, "note": "untrained (random weights)",
            "library_versions": registry.library_versions()}
    registry.write_package(out_dir, model, card)
    return out_dir


def prepare_smoke(cfg: ScoreConfig) -> None:
    """For --smoke-test: create the configured local archive (synthetic smears + one bad file) and an untrained
    model package when they do not exist yet."""
    from .synth import make_dataset

    if cfg.model and not storage.is_remote(cfg.model) and not os.path.exists(os.path.join(cfg.model, CARD)) \
            and not os.path.exists(os.path.join(cfg.model, LATEST)):
        log(f"smoke test: writing an untrained model package to {cfg.model}")
        untrained_package(cfg.model, image_size=64)
    if cfg.input and not storage.is_remote(cfg.input) and not os.path.exists(cfg.input):
        log(f"smoke test: writing a synthetic archive to {cfg.input}")
        make_dataset(cfg.input, per_class=5, size=64, seed=0)
        with open(os.path.join(cfg.input, "not-an-image.jpg"), "w") as f:
            f.write("this is text, not a JPEG\n")



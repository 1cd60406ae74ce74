#!/usr/bin/env python
"""What a training step's augmentation costs on this machine, per policy and codec choice, beside the network's own
forward and backward pass: the draws `leukray train` makes each step (with `consistency` > 0: the batch as trained,
at `augment_p`, and its fully shifted copy) on a batch of generated 224 px smears. Prints one JSON object: ms per
step for each setting, and for the network (MobileNetV2, both copies forward and backward, channels-last fp32).

    .venv/bin/python bench/augment_cost.py [--batch-size 32] [--steps 20] [--device cpu|cuda]
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

from leukray.augment import CODECS, POLICIES, augment_batch, flips_and_rotation  # noqa: E402
from leukray.data import CLASSES  # noqa: E402
from leukray.model import ModelConfig, build_model  # noqa: E402
from leukray.synth import smear_image  # noqa: E402


def step_draws(x: torch.Tensor, policy: str, codecs: tuple[str, ...], g: torch.Generator | None,
               p: float) -> torch.Tensor:
    """The augmentation of one training step with consistency on, as `leukray.train.fit` draws it."""
    x = flips_and_rotation(x, g, zoom=1.2)  # configs/train.yaml's augment_zoom
    shifted = augment_batch(x, policy, g, p=1.0, geometry=False, codecs=codecs)
    return torch.cat([augment_batch(x, policy, g, p=p, geometry=False, codecs=codecs), shifted])


def timed(fn, steps: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--augment-p", type=float, default=0.25)
    ap.add_argument("--policies", default="lab_sensor", help=f"comma-separated, of: {', '.join(POLICIES)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    for policy in a.policies.split(","):
        if policy not in POLICIES:
            ap.error(f"--policies: {policy!r} is not a policy; allowed: {', '.join(POLICIES)}")
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    images = np.stack([np.asarray(smear_image(CLASSES[i % len(CLASSES)], rng, a.size)) for i in range(a.batch_size)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device)
    g = torch.Generator().manual_seed(0) if device.type == "cpu" else None

    out: dict = {"device": str(device), "batch_size": a.batch_size, "size": a.size, "steps": a.steps,
                 "torch_threads": torch.get_num_threads(), "augment_ms_per_step": {}}
    for policy in a.policies.split(","):
        for codecs in [("jpeg",), *[("jpeg", c) for c in CODECS if c != "jpeg"]]:
            key = f"{policy}/{'+'.join(codecs)}"
            out["augment_ms_per_step"][key] = round(timed(lambda: step_draws(x, policy, codecs, g, a.augment_p),
                                                          a.steps, sync), 1)

    model = build_model(ModelConfig(weights="none"), len(CLASSES), verbose=False)
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    batch = torch.cat([x, x]).contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(len(batch), dtype=torch.long, device=device)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(batch), labels).backward()
        opt.step()

    out["network_ms_per_step"] = round(timed(train_step, a.steps, sync), 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Grad-CAM (leukray/heatmap.py): on images whose class is decided by one quadrant alone (the colour of a disc
there), a LeukNet trained a few steps to tell them apart looks there — its heat map for the predicted class peaks
in that quadrant, not on the distractor discs elsewhere."""

from __future__ import annotations

import numpy as np
import torch

from leukray.heatmap import gradcam, overlay, target_layer
from leukray.model import ModelConfig, build_model

SIZE = 128  # 4x4 cells in the last features block: 2x2 per quadrant
SIGNAL = (1, 1)  # the bottom-right quadrant carries the class; the others hold distractors


def _disc(img: np.ndarray, qy: int, qx: int, colour: tuple[int, int, int], rng: np.random.Generator) -> None:
    h = SIZE // 2
    r = int(rng.integers(SIZE // 12, SIZE // 8))
    cy, cx = qy * h + rng.integers(r + 2, h - r - 2), qx * h + rng.integers(r + 2, h - r - 2)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2] = colour


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A disc in the signal quadrant, purple for class 1, green for class 0. Every other quadrant holds a grey
    disc with probability 1/2 whatever the class, so only the signal quadrant tells the classes apart."""
    rng = np.random.default_rng(seed)
    x = rng.integers(200, 250, (n, SIZE, SIZE, 3), dtype=np.uint8)
    y = rng.integers(0, 2, n)
    for i in range(n):
        for qy in (0, 1):
            for qx in (0, 1):
                if (qy, qx) == SIGNAL:
                    _disc(x[i], qy, qx, (90, 40, 120) if y[i] == 1 else (40, 120, 60), rng)
                elif rng.random() < 0.5:
                    _disc(x[i], qy, qx, (110, 110, 110), rng)
    return x, y


def test_heatmap_peaks_where_the_class_signal_is():
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="imagenet", head_width=0, dropout=0.0), num_classes=4, verbose=False)
    assert target_layer(model) is model.features[-1]
    x_train, y_train = make_images(160, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(40):
        idx = np.random.default_rng(step).choice(len(x_train), 16, replace=False)
        xb = torch.from_numpy(x_train[idx]).permute(0, 3, 1, 2).float()
        loss = torch.nn.functional.cross_entropy(model(xb), torch.from_numpy(y_train[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    x_test, y_test = make_images(64, seed=2)
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test).permute(0, 3, 1, 2).float()).argmax(1).numpy()
    assert (pred == y_test).mean() >= 0.9, "the model did not learn the signal quadrant; the heat maps mean nothing"

    positive = np.flatnonzero((y_test == 1) & (pred == 1))
    maps = gradcam(model, x_test[positive], [1] * len(positive), batch_size=8)
    assert maps.shape == (len(positive), SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
    h = SIZE // 2
    sy, sx = slice(SIGNAL[0] * h, SIGNAL[0] * h + h), slice(SIGNAL[1] * h, SIGNAL[1] * h + h)
    share = maps[:, sy, sx].sum((1, 2)) / maps.sum((1, 2)).clip(1e-9)
    peaks = [np.unravel_index(m.argmax(), m.shape) for m in maps]
    in_signal = np.mean([(py // h, px // h) == SIGNAL for py, px in peaks])
    print(f"heat in the signal quadrant: {share.mean():.2f} of the map; peak there in {in_signal:.0%} of "
          f"{len(positive)} images")
    assert in_signal >= 0.9
    assert share.mean() > 0.5  # a quarter of the image holds most of the heat

    blended = overlay(x_test[positive[0]], maps[0])
    assert blended.shape == (SIZE, SIZE, 3) and blended.dtype == np.uint8

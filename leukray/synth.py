"""Synthetic smear-like images for the embedded demo and the tests (the real dataset cannot ship).

Each image is a pink field of red cells around one lymphoid cell. The classes differ in visible morphology,
loosely after the FAB descriptions, so a short run must learn shape, not just colour:
Benign — small cell, round dense nucleus, thin pale rim; Early Pre-B — larger, round nucleus, fine chromatin,
scant cytoplasm; Pre-B — indented (cleft) nucleus with vacuolated cytoplasm; Pro-B — large irregular nucleus with
prominent nucleoli and deep-blue cytoplasm. Stain tint, position and size vary per image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from . import CLASSES

FOLDERS = {"Benign": "Benign", "Early Pre-B": "Early", "Pre-B": "Pre", "Pro-B": "Pro"}
"""The public dataset's folder names, so generated data exercises the alias mapping."""


def _tint(rgb: tuple[int, int, int], shift: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + s, 0, 255)) for c, s in zip(rgb, shift))  # type: ignore[return-value]


def smear_image(cls: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """One synthetic smear image of class `cls` (a canonical class name)."""
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; allowed: {', '.join(CLASSES)}")
    s = size / 96.0
    stain = rng.normal(0, 10, size=3)
    img = Image.new("RGB", (size, size), _tint((236, 210, 215), stain))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 16))):  # red cells
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(7, 10) * s
        d.ellipse([x - r, y - r, x + r, y + r], fill=_tint((214, 150, 160), stain), outline=_tint((190, 120, 135), stain))
    cx, cy = size / 2 + rng.normal(0, 4 * s), size / 2 + rng.normal(0, 4 * s)
    k = CLASSES.index(cls)
    cell_r = [14, 22, 24, 27][k] * s * rng.uniform(0.9, 1.1)
    nuc_frac = [0.78, 0.88, 0.72, 0.82][k]
    cyto = [(205, 190, 225), (180, 170, 215), (175, 160, 210), (110, 120, 200)][k]
    d.ellipse([cx - cell_r, cy - cell_r, cx + cell_r, cy + cell_r], fill=_tint(cyto, stain))
    nr = cell_r * nuc_frac
    nuc = [(60, 20, 90), (105, 60, 150), (95, 50, 140), (120, 70, 160)][k]
    if k == 3:  # irregular, lobed nucleus
        for _ in range(5):
            ox, oy = rng.normal(0, nr * 0.25, size=2)
            rr = nr * rng.uniform(0.55, 0.75)
            d.ellipse([cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr], fill=_tint(nuc, stain))
    else:
        ecc = rng.uniform(0.9, 1.1)
        d.ellipse([cx - nr * ecc, cy - nr / ecc, cx + nr * ecc, cy + nr / ecc], fill=_tint(nuc, stain))
    if k == 2:  # cleft nucleus and vacuoles
        a = rng.uniform(0, 2 * np.pi)
        ox, oy = np.cos(a) * nr * 0.9, np.sin(a) * nr * 0.9
        rr = nr * 0.45
        d.ellipse([cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr], fill=_tint(cyto, stain))
        for _ in range(int(rng.integers(3, 6))):
            b = rng.uniform(0, 2 * np.pi)
            vx, vy = cx + np.cos(b) * cell_r * 0.85, cy + np.sin(b) * cell_r * 0.85
            vr = 2.2 * s
            d.ellipse([vx - vr, vy - vr, vx + vr, vy + vr], fill=_tint((240, 235, 245), stain))
    if k == 3:  # prominent nucleoli
        for _ in range(int(rng.integers(2, 4))):
            ox, oy = rng.normal(0, nr * 0.3, size=2)
            rr = 3.0 * s
            d.ellipse([cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr], fill=_tint((185, 160, 215), stain))
    if k == 1:  # fine chromatin speckle
        for _ in range(25):
            ox, oy = rng.normal(0, nr * 0.4, size=2)
            d.point((cx + ox, cy + oy), fill=_tint((80, 40, 120), stain))
    img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.9) * s))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_dataset(out_dir: str | Path, per_class: int = 40, size: int = 96, seed: int = 0,
                 duplicates: int = 0) -> Path:
    """Write a labelled folder (public-dataset folder names) of JPEGs; `duplicates` byte-identical copies per class
    mimic the dataset's exact duplicates so the leakage-aware split can be tested."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        folder = out / FOLDERS[cls]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            smear_image(cls, rng, size).save(folder / f"{FOLDERS[cls]}-{i:04d}.jpg", quality=92)
        for j in range(min(duplicates, per_class)):
            src = folder / f"{FOLDERS[cls]}-{j:04d}.jpg"
            (folder / f"{FOLDERS[cls]}-{j:04d}-dup.jpg").write_bytes(src.read_bytes())
    return out

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
from .images import is_image_name

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


OOD_FOLDERS = ("texture", "blank", "defocus", "natural", "other_stain", "screen", "tissue", "magnified", "wide_field")
"""What `make_ood_folders` writes: inputs a nightly archive can hold that are not smears like the training ones."""


def _crop_resize(arr: np.ndarray, rng: np.random.Generator, size: int, side: int | None = None,
                 resample: Image.Resampling = Image.Resampling.BILINEAR) -> Image.Image:
    """A random square of `side` pixels (default: a random quarter to all of the short side), resized to `size`."""
    h, w = arr.shape[:2]
    side = int(rng.integers(min(h, w) // 4, min(h, w))) if side is None else side
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return Image.fromarray(arr[y:y + side, x:x + side]).resize((size, size), resample)


def _texture(rng: np.random.Generator, size: int) -> Image.Image:
    """Smoothed coloured noise at a random scale: debris, dust, a dirty lens, sensor garbage."""
    scale = int(rng.integers(2, 32))
    small = rng.uniform(0, 255, size=(max(2, size // scale), max(2, size // scale), 3)).astype(np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 3))))


def _blank(rng: np.random.Generator, size: int) -> Image.Image:
    """An empty field: a uniform lamp-coloured (or dark) frame with vignetting and sensor noise."""
    level = rng.choice([rng.uniform(200, 255), rng.uniform(0, 60), rng.uniform(60, 200)])
    colour = np.clip(level + rng.normal(0, 15, size=3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    vignette = 1 - rng.uniform(0, 0.8) * (xx ** 2 + yy ** 2)
    arr = colour[None, None, :] * vignette[..., None] + rng.normal(0, rng.uniform(1, 8), size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _screen(rng: np.random.Generator, size: int) -> Image.Image:
    """A screenshot, form or slide label: flat panels, lines of text, a chart."""
    bg = tuple(int(v) for v in rng.choice([[255, 255, 255], [240, 240, 240], [30, 30, 30], [250, 245, 220]]))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.uniform(0, size, 2)
        d.rectangle([x0, y0, x0 + rng.uniform(20, size), y0 + rng.uniform(10, size / 2)],
                    fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    ink = (0, 0, 0) if sum(bg) > 380 else (235, 235, 235)
    words = ["Patient", "ID", "Sample", "WBC", "Slide", "2026-11-03", "Lab", "Giemsa", "x100", "OK", "Cancel"]
    for row in range(int(rng.integers(3, 12))):
        text = " ".join(rng.choice(words, int(rng.integers(1, 5))))
        d.text((rng.uniform(2, size / 3), 4 + row * size / 12), text, fill=ink)
    if rng.uniform() < 0.5:  # a bar chart
        for i in range(int(rng.integers(3, 8))):
            hgt = rng.uniform(10, size / 2)
            d.rectangle([10 + i * 14, size - 10 - hgt, 20 + i * 14, size - 10], fill=tuple(int(v) for v in rng.integers(0, 200, 3)))
    return img


def defocus_field(arr: np.ndarray, rng: np.random.Generator, size: int,
                  radius: tuple[float, float] = (5.0, 12.0)) -> Image.Image:
    """A field out of focus as a camera records it: blurred in linear light (`leukray.colour.GAMMA`) by a disc, an
    out-of-focus lens' point spread, of a radius drawn from `radius` (px at 224 px; default 5–12); then the
    robustness suite's shot noise (600–2000 photons at white), read noise (σ 1–3 of 255 levels) and JPEG (quality
    85). Noise matters: it is fine structure, so a field blurred without it is easier to tell from a sharp one than a
    real camera's defocus is."""
    from scipy.signal import fftconvolve

    from .colour import GAMMA
    from .perturb import apply_perturbation

    r = float(rng.uniform(*radius)) * size / 224
    pad = int(np.ceil(r))
    yy, xx = np.mgrid[-pad:pad + 1, -pad:pad + 1]
    disc = (yy ** 2 + xx ** 2 <= r * r).astype(np.float64)
    linear = (arr.astype(np.float64) / 255.0) ** GAMMA
    linear = np.stack([fftconvolve(np.pad(linear[..., c], pad, mode="reflect"), disc / disc.sum(), mode="valid")
                       for c in range(3)], axis=-1)
    out = (np.clip(linear, 0, 1) ** (1 / GAMMA) * 255).round().astype(np.uint8)[None]
    noise = (("shot_noise", float(rng.uniform(600, 2000))), ("noise", float(rng.uniform(1, 3)) / 255), ("jpeg", 85))
    for (name, severity), seed in zip(noise, rng.integers(2 ** 31, size=len(noise))):
        out = apply_perturbation(out, name, severity, seed=int(seed))
    return Image.fromarray(out[0])


def _magnified(arr: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    """A field seen ×2.5–4 closer: a random square of 1/zoom of the side, scaled back up."""
    side = max(8, int(min(arr.shape[:2]) / rng.uniform(2.5, 4.0)))
    return _crop_resize(arr, rng, size, side, Image.Resampling.BICUBIC)


def _wide_field(smears: list[np.ndarray], rng: np.random.Generator, size: int) -> Image.Image:
    """Smears through a ×2–3 weaker objective (or a camera with a ×2–3 wider field): the fields of 4 or 9 smears,
    each scaled down, side by side, so the cells are a half to a third of their trained size — a dataset of whole
    low-magnification fields."""
    m = int(rng.integers(2, 4))
    tile = size // m
    canvas = Image.new("RGB", (tile * m, tile * m))
    for k in range(m * m):
        im = Image.fromarray(smears[int(rng.integers(len(smears)))]).resize((tile, tile), Image.Resampling.BILINEAR)
        canvas.paste(im.rotate(90 * int(rng.integers(4))), ((k % m) * tile, (k // m) * tile))
    return canvas.resize((size, size), Image.Resampling.BILINEAR)


def _other_stain(arr: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A smear under a colour response no lab's stain gives: channels swapped, inverted, grey, or hue-rotated."""
    kind = int(rng.integers(0, 4))
    if kind == 0:
        perm = rng.permutation(3)
        while (perm == np.arange(3)).all():
            perm = rng.permutation(3)
        out = arr[..., perm]
    elif kind == 1:
        out = 255 - arr
    elif kind == 2:
        g = (arr @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        out = np.repeat(g[..., None], 3, axis=2)
    else:
        hsv = np.asarray(Image.fromarray(arr).convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(64, 192))) % 256
        out = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    return Image.fromarray(np.ascontiguousarray(out).astype(np.uint8))


def make_ood_folders(out_dir: str | Path, source: str | Path | None = None, per_folder: int = 40, size: int = 224,
                     seed: int = 0) -> Path:
    """Write one folder per kind in OOD_FOLDERS of images that are not in-distribution smears, to measure the
    out-of-distribution guard (`leukray evaluate --ood`). `source`: a folder of real smear images (any depth) for
    `defocus` and `other_stain`; without one, generated smears stand in. `natural` crops the photographs that
    scikit-learn ships (`sklearn.datasets.load_sample_images`); `tissue` crops, at random sizes and turns, the real
    micrograph scikit-image ships of a colon section under another stain (immunohistochemistry: DAB brown and
    haematoxylin blue, `skimage.data.immunohistochemistry`) — real microscopy, real stain, not a blood smear;
    `magnified` shows the smears through a ×2.5–4 stronger objective (one or two cells fill the field, as in
    datasets of single-cell crops), `wide_field` through a ×2–3 weaker one (whole low-magnification fields)."""
    from skimage.data import immunohistochemistry
    from sklearn.datasets import load_sample_images

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    if source is not None:
        files = sorted(p for p in Path(source).rglob("*") if is_image_name(p.name))
        if not files:
            raise ValueError(f"--source {source}: no images found")
        picks = rng.choice(len(files), size=min(per_folder, len(files)), replace=False)
        smears = [np.asarray(Image.open(files[i]).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
                  for i in picks]
    else:
        smears = [np.asarray(smear_image(CLASSES[i % len(CLASSES)], rng, size)) for i in range(per_folder)]
    photos = load_sample_images().images
    section = immunohistochemistry()
    makers = {
        "texture": lambda i: _texture(rng, size),
        "blank": lambda i: _blank(rng, size),
        "defocus": lambda i: defocus_field(smears[i % len(smears)], rng, size),
        "natural": lambda i: _crop_resize(photos[i % len(photos)], rng, size),
        "other_stain": lambda i: _other_stain(smears[i % len(smears)], rng),
        "screen": lambda i: _screen(rng, size),
        "tissue": lambda i: _crop_resize(section, rng, size).rotate(90 * int(rng.integers(4))),
        "magnified": lambda i: _magnified(smears[i % len(smears)], rng, size),
        "wide_field": lambda i: _wide_field(smears, rng, size),
    }
    for name, make in makers.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            make(i).save(folder / f"{name}-{i:04d}.png")
    return out

"""Decoding and preprocessing: the single code path shared by training, evaluation and scoring.

An image becomes a square RGB uint8 array of `image_size` pixels (bilinear, antialiased). A non-square field is
letterboxed, not squashed: scaled so its longer side fits, centred, and the rest filled with the field's own
background colour (the median of its brightest tenth), so cells keep their shape and scale and the in-network colour
constancy sees the same background. The model itself rescales to [0, 1] and normalises (see `leukray.model`), so
what crosses process boundaries stays uint8.

Files as microscope cameras and slide software write them: the EXIF orientation is applied; 16-bit and float
grey images and 16-bit-per-channel colour PNG/TIFF are scaled by their bit depth (the smallest of 8/10/12/14/16 bits
that holds the brightest value, so a 12-bit camera's file is not rendered dark, and never clipped to white);
transparent pixels become white, the colour of an empty field. An embedded RGB ICC colour profile (a camera's wide-gamut
RGB such as Adobe RGB or Display P3) is honoured: pixels are converted to sRGB, the colours the
network was trained on, instead of being read as sRGB and coming out duller or shifted. A profile that cannot be
read is ignored and the pixels are taken as sRGB.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")
IMAGE_TYPES = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
"""The extensions as messages name them: jpg/jpeg/…/gif."""

MAX_PIXELS = 64_000_000
"""Images above this many pixels are refused as decompression bombs (a smear field is a few megapixels)."""


class ImageDecodeError(ValueError):
    """A file is not a usable image; the message says why in words a lab engineer can act on."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _full_scale(a: np.ndarray, unit_float: bool) -> float:
    """The white level of a high-depth image: 1.0 for floats in [0, 1], else the smallest of 8/10/12/14/16 bits
    holding its brightest value (a 12-bit camera's values in a 16-bit file are not rendered dark)."""
    top = float(np.nanmax(a)) if a.size else 0.0
    if unit_float and top <= 1.0:
        return 1.0
    return next((2.0 ** b - 1 for b in (8, 10, 12, 14, 16) if top <= 2 ** b - 1), max(top, 1.0))


def _high_depth_colour(data: bytes) -> Image.Image:
    """A 16-bit-per-channel colour PNG/TIFF, whose low byte Pillow drops, read in full (OpenCV) and scaled by its
    bit depth; alpha over white."""
    import cv2

    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # as stored, but a TIFF comes upright
    if a is None or a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ImageDecodeError("cannot decode the 16-bit colour image")
    a = a.astype(np.float64)
    full = _full_scale(a[..., :3], unit_float=False)
    rgb = a[..., 2::-1] / full
    if a.shape[2] == 4:
        alpha = a[..., 3:] / full
        rgb = rgb * alpha + (1.0 - alpha)
    return Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8))


def _is_high_depth_colour(img: Image.Image) -> bool:
    rawmode = img.tile[0].args if img.tile else None
    rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
    return img.mode in ("RGB", "RGBA") and isinstance(rawmode, str) and ";16" in rawmode


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: high-depth grey by its bit depth, alpha over white, the rest by PIL's conversion."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        full = _full_scale(a, unit_float=img.mode == "F")
        grey = np.clip(np.nan_to_num(a) / full * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _srgb_transform(img: Image.Image) -> ImageCms.ImageCmsTransform | None:
    """The conversion from the image's embedded RGB profile to sRGB, or None: no profile, one Little CMS cannot read,
    or one that is not an RGB profile of RGB pixels."""
    icc = img.info.get("icc_profile")
    return _transform_to_srgb(bytes(icc)) if icc and img.mode in ("RGB", "RGBA") else None


@functools.lru_cache(maxsize=16)
def _transform_to_srgb(icc: bytes) -> ImageCms.ImageCmsTransform | None:
    """Built once per distinct profile (a camera writes the same one into every file): building costs more than
    applying it to a 224-pixel image."""
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if src.profile.xcolor_space != "RGB ":
            return None
        return ImageCms.buildTransform(src, _SRGB, "RGB", "RGB")
    except (OSError, ValueError, ImageCms.PyCMSError):
        return None


def _letterbox(img: Image.Image, size: int) -> Image.Image:
    """Scale so the longer side is `size`; a non-square result is centred on its background colour."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
    if (nw, nh) == (size, size):
        return img
    pixels = np.asarray(img, dtype=np.uint8).reshape(-1, 3)
    brightness = pixels.sum(1, dtype=np.int32)
    background = np.median(pixels[brightness >= np.quantile(brightness, 0.9)], axis=0)
    out = Image.new("RGB", (size, size), tuple(int(v) for v in background))
    out.paste(img, ((size - nw) // 2, (size - nh) // 2))
    return out


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Bytes of a JPEG/PNG/TIFF/BMP/WebP/GIF → (image_size, image_size, 3) uint8 RGB. Raises ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageDecodeError(f"image too large: {w}x{h} pixels exceeds the {MAX_PIXELS} pixel limit (decompression bomb?)")
            if img.format == "JPEG":
                # Let libjpeg downscale while decoding: large fields decode several times faster.
                img.draft("RGB", (image_size, image_size))
            if _is_high_depth_colour(img):
                full = _high_depth_colour(data)
                # OpenCV turns a TIFF upright itself (its orientation tag); a PNG's eXIf orientation is ours to apply
                if img.format != "TIFF" and "exif" in img.info:
                    full.info["exif"] = img.info["exif"]
                img = full
            ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
            to_srgb = _srgb_transform(img)
            img = _to_rgb(img)
            if img.size != (image_size, image_size):
                img = _letterbox(img, image_size)
            if to_srgb is not None:  # converted at the final size, where it costs least
                img = to_srgb.apply(img)
            return np.asarray(img, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"image too large (decompression bomb): {err}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image or unsupported format (cannot identify image file)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"cannot decode image (truncated or corrupt): {err}") from None


def to_chw(batch_hwc: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 → contiguous (N, 3, H, W) uint8, the layout models take."""
    return np.ascontiguousarray(batch_hwc.transpose(0, 3, 1, 2))

"""Decoding and preprocessing: the single code path shared by training, evaluation and scoring.

An image becomes a square RGB uint8 array of `image_size` pixels (bilinear, antialiased). The model itself
rescales to [0, 1] and normalises (see `leukray.model`), so what crosses process boundaries stays uint8.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

MAX_PIXELS = 64_000_000
"""Images above this many pixels are refused as decompression bombs (a smear field is a few megapixels)."""


class ImageDecodeError(ValueError):
    """A file is not a usable image; the message says why in words a lab engineer can act on."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Bytes of a JPEG/PNG/TIFF/BMP → (image_size, image_size, 3) uint8 RGB. Raises ImageDecodeError."""
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
            img = img.convert("RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
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

"""Decoding files as microscope cameras and slide software write them: the one path training, evaluation and
scoring share (leukray.images)."""

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms

from leukray.images import ImageDecodeError, decode_image, is_image_name

RAMP = np.linspace(0.0, 1.0, 64 * 64).reshape(64, 64)


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("name,array,fmt", [
    ("16-bit grey PNG", (RAMP * 65535).astype(np.uint16), "PNG"),
    ("12-bit grey in a 16-bit PNG", (RAMP * 4095).astype(np.uint16), "PNG"),
    ("16-bit grey TIFF", (RAMP * 65535).astype(np.uint16), "TIFF"),
    ("float grey TIFF in [0, 1]", RAMP.astype(np.float32), "TIFF"),
    ("8-bit grey PNG", (RAMP * 255).astype(np.uint8), "PNG"),
])
def test_high_depth_grey_keeps_its_tones(name, array, fmt):
    out = decode_image(_encode(array, fmt), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # a ramp from black to white stays one: not clipped to white, not crushed to black
    assert out.min() <= 2 and out.max() >= 253, name
    assert abs(float(out.mean()) - 127.5) < 3, name


def _colour_ramp(full: int) -> np.ndarray:
    return np.round(np.stack([RAMP, RAMP[::-1], RAMP.T], -1) * full).astype(np.uint16)


def _tiff(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, photometric="rgb", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("name,data", [
    ("16-bit RGB TIFF", lambda: _tiff(_colour_ramp(65535))),
    ("12-bit RGB in a 16-bit TIFF", lambda: _tiff(_colour_ramp(4095))),
    ("12-bit RGB in a 16-bit compressed TIFF", lambda: _tiff(_colour_ramp(4095), compression="zlib")),
    ("10-bit RGB in a 16-bit PNG", lambda: cv2.imencode(".png", _colour_ramp(1023)[..., ::-1])[1].tobytes()),
])
def test_high_depth_colour_keeps_its_tones(name, data):
    out = decode_image(data(), 64)
    expected = np.stack([RAMP, RAMP[::-1], RAMP.T], -1) * 255
    assert np.abs(out - expected).max() <= 1.5, name


def _png_with_orientation(png: bytes, orientation: int) -> bytes:
    """Insert an eXIf chunk after IHDR (OpenCV writes none)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif") else exif.tobytes()
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    return png[:33] + chunk + png[33:]


def test_high_depth_colour_alpha_and_orientation():
    rgba = np.zeros((20, 40, 4), np.uint16)
    rgba[:, :20] = (4095, 0, 0, 4095)  # opaque red on the left half as stored, transparent right half
    png = cv2.imencode(".png", rgba[..., [2, 1, 0, 3]])[1].tobytes()
    out = decode_image(png, 40)
    assert (out[10:30, :20] == (255, 0, 0)).all() and (out[10:30, 20:] == 255).all()
    # displayed rotated 90° clockwise: the stored left half is on top, in a TIFF and in a PNG
    red_on_top = np.zeros((20, 40, 3), np.uint16)
    red_on_top[:, :20] = (4095, 0, 0)
    for data in (_tiff(red_on_top, extratags=[(274, "H", 1, 6, False)]),
                 _png_with_orientation(cv2.imencode(".png", red_on_top[..., ::-1])[1].tobytes(), 6)):
        turned = decode_image(data, 40)
        assert turned[:20, 12:28, 0].mean() > 250 and turned[20:, 12:28, 0].mean() < 5


def test_transparent_pixels_become_white_background():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:16, :, :3] = (120, 40, 160)  # an opaque violet top half
    rgba[:16, :, 3] = 255
    out = decode_image(_encode(rgba, "PNG"), 32)
    assert (out[20:] == 255).all()
    assert np.abs(out[:12].astype(int) - (120, 40, 160)).max() <= 1


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20, 0] = 255  # red on the left half as stored
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise: the stored left half is on top
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    out = decode_image(buf.getvalue(), 32)  # 20 wide x 40 tall once turned: the field is columns 8-23
    assert out[:10, 10:22, 0].mean() > 200 and out[-10:, 10:22, 0].mean() < 50


def _wide_gamut_profile() -> bytes:
    """An ICC profile with ProPhoto RGB (ROMM)'s primaries, a camera raw converter's wide gamut, and sRGB's tone curve:
    Little CMS's built-in sRGB profile with its three colorant tags rewritten, renamed so nothing mistakes it for sRGB."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    colorants = {b"rXYZ": (0.7977, 0.2880, 0.0), b"gXYZ": (0.1352, 0.7119, 0.0), b"bXYZ": (0.0313, 0.0001, 0.8249)}
    for i in range(struct.unpack(">I", icc[128:132])[0]):
        sig, offset, _ = struct.unpack(">4sII", icc[132 + 12 * i:144 + 12 * i])
        if sig in colorants:
            icc[offset + 8:offset + 20] = struct.pack(">3i", *(round(v * 65536) for v in colorants[sig]))
        if sig == b"desc":  # 'mluc': one record, UTF-16BE text at the record's offset
            length, start = struct.unpack(">II", icc[offset + 20:offset + 28])
            name = "wide gamut"[:length // 2].ljust(length // 2).encode("utf-16-be")
            icc[offset + start:offset + start + length] = name
    icc[84:100] = bytes(16)  # no profile ID (an MD5 of the rest)
    return bytes(icc)


def _smear_colours() -> np.ndarray:
    """A 32 × 32 patchwork of a smear's colours: background, pink red cells, violet nuclei, blue cytoplasm."""
    colours = np.array([(238, 232, 226), (214, 150, 170), (110, 60, 150), (150, 170, 215)], np.uint8)
    return np.kron(colours[np.arange(16).reshape(4, 4) % 4], np.ones((8, 8, 1), np.uint8)).astype(np.uint8)


@pytest.mark.parametrize("fmt,tolerance", [("PNG", 2), ("JPEG", 6), ("TIFF", 2), ("WEBP", 8)])
def test_embedded_colour_profile_is_converted_to_srgb(fmt, tolerance):
    srgb = _smear_colours()
    wide = _wide_gamut_profile()
    to_wide = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.ImageCmsProfile(io.BytesIO(wide)),
                                      "RGB", "RGB")
    stored = np.asarray(to_wide.apply(Image.fromarray(srgb)))
    # the file's numbers are not sRGB: read as sRGB, the red cells and nuclei would come out duller
    assert np.abs(stored.astype(int) - srgb).max() >= 20
    kw = {"lossless": True} if fmt == "WEBP" else {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    out = decode_image(_encode(stored, fmt, icc_profile=wide, **kw), 32)
    assert np.abs(out.astype(int) - srgb)[2:-2, 2:-2].max() <= tolerance


def test_srgb_and_unreadable_profiles_keep_the_pixels():
    srgb = _smear_colours()
    tagged = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert np.abs(decode_image(_encode(srgb, "PNG", icc_profile=tagged), 32).astype(int) - srgb).max() <= 1
    # a broken profile is ignored: the pixels are read as sRGB, the image is not lost
    assert (decode_image(_encode(srgb, "PNG", icc_profile=b"not a profile" * 20), 32) == srgb).all()


@pytest.mark.parametrize("width,height", [(120, 90), (90, 120), (160, 90)])
def test_non_square_field_is_letterboxed_on_its_background(width, height):
    yy, xx = np.mgrid[:height, :width]
    field = np.full((height, width, 3), (236, 244, 250), np.uint8)  # a bluish empty background
    cell = np.hypot(yy - height / 2, xx - width / 2) < 30
    field[cell] = (110, 60, 150)  # one round violet cell in the middle
    out = decode_image(_encode(field, "PNG"), 64)
    scale = 64 / max(width, height)
    violet = np.all(np.abs(out.astype(int) - (110, 60, 150)) < 30, -1)
    rows, cols = np.nonzero(violet)
    # the cell stays round (not squashed) and keeps its size relative to the field's longer side
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1
    assert abs((cols.max() - cols.min() + 1) - 60 * scale) <= 2
    # the bands the field does not cover take its background colour, not black or white
    assert np.abs(out[0, 0].astype(int) - (236, 244, 250)).max() <= 2
    assert np.abs(out[-1, -1].astype(int) - (236, 244, 250)).max() <= 2


def test_webp_is_listed_and_decoded():
    assert is_image_name("field-01.WEBP") and is_image_name("a/b.tif") and not is_image_name("notes.txt")
    rgb = (np.stack([RAMP, RAMP[::-1], RAMP.T], -1) * 255).astype(np.uint8)
    out = decode_image(_encode(rgb, "WEBP", lossless=True), 64)
    assert np.abs(out.astype(int) - rgb).max() <= 2


def test_gif_with_transparency_is_listed_and_decoded_over_white():
    assert is_image_name("scan.GIF") and is_image_name("field.jfif") and is_image_name("field.jpe")
    index = np.zeros((32, 32), np.uint8)
    index[:, :16] = 1  # violet left half; palette entry 0 (the right half) is transparent
    img = Image.fromarray(index, "P")
    img.putpalette([0, 0, 0, 120, 40, 160])
    buf = io.BytesIO()
    img.save(buf, "GIF", transparency=0)
    out = decode_image(buf.getvalue(), 32)
    assert (out[:, 20:] == 255).all()
    assert np.abs(out[:, :12].astype(int) - (120, 40, 160)).max() <= 8


@pytest.mark.parametrize("data,message", [
    (b"", "empty file"),
    (b"plain text, not an image", "not an image"),
])
def test_bad_bytes_are_named(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, 32)

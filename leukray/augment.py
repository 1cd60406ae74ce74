"""Augmentation policies, applied to whole batches on the training device (the GPU when there is one).

Inputs are float NCHW in [0, 255] (decoded once, cached as uint8). Policies:
- `none`: identity.
- `study`: the study's random horizontal/vertical flips and rotations.
- `stain`: study + per-image colour/stain jitter (hue, saturation, brightness, contrast, gamma): labs stain and
  photograph differently.
- `robust`: stain + camera/compression artefacts (blur, sensor noise, down-/up-scaling, JPEG re-encoding).
- `lab`: robust + another lab's colour response (`leukray.colour`): white balance and colour cast as per-channel
  gains and exposure in linear light with clipped highlights, and the amount and balance of the two dyes in
  optical density. Hue/saturation/brightness jitter alone never shows the network a per-channel gain.
- `lab_defects`: lab + the optics and sensor defects of everyday microscope cameras (`optics_defects`): motion
  blur, shot and impulse noise, pixelation, colour planes out of register, veiling glare, a brighter display gain.
- `lab_sensor` (configs/train.yaml's): lab + the sensor defects alone (`sensor_defects`: shot and impulse noise,
  pixelation, colour planes out of register), without lab_defects' motion blur, glare and display gain.
- `lab_dust_levels`: lab_sensor + specks of dust or debris on the field and the camera software's automatic levels
  (`dust_and_levels`).

`codecs` (robust and the lab policies): the camera part re-encodes a random half of each batch at quality 5–60 in
JPEG by default; with ("jpeg", "webp") each such batch goes through one of the two at even odds, for archives that
a viewer, a web archive or a cloud store re-encoded as WebP, whose smoothed blocks and ringing JPEG does not show.

`p` (stain, robust): the fraction of images that get the colour/camera part; 1.0 = all.

`zoom` (every policy but `none`): magnification jitter, a factor drawn log-uniformly from [1/zoom, zoom] and
folded into the flip/rotation resample (no extra pass): labs use different objectives and cameras, so the same
cell covers a different number of pixels. 1.0 = off.
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from torchcodec.decoders import decode_jpeg
from torchcodec.encoders import JpegEncoder
from torchvision.transforms.v2 import functional as TF

POLICIES = ("none", "study", "stain", "robust", "lab", "lab_defects", "lab_sensor", "lab_dust_levels")
CAMERA_POLICIES = ("robust", "lab", "lab_defects", "lab_sensor", "lab_dust_levels")
"""The policies with a camera part (blur, noise, scaling, re-encoding)."""
CODECS = ("jpeg", "webp")
"""The codecs the camera part's re-encoding step can draw from (`codecs`)."""

_LUMA = torch.tensor([0.299, 0.587, 0.114])


def check_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"augment={name!r} is not a policy; allowed: {', '.join(POLICIES)}")
    return name


def check_codecs(codecs: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    for c in codecs:
        if c not in CODECS:
            raise ValueError(f"augment_codecs: {c!r} is not a codec; allowed: {', '.join(CODECS)}")
        if list(codecs).count(c) > 1:
            raise ValueError(f"augment_codecs names {c!r} twice")
    if not codecs:
        raise ValueError(f"augment_codecs is empty; name at least one of {', '.join(CODECS)}")
    return tuple(codecs)


def augment_batch(x: torch.Tensor, policy: str, generator: torch.Generator | None = None,
                  strength: float = 1.0, zoom: float = 1.0, p: float = 1.0, geometry: bool = True,
                  camera: bool = True, codecs: tuple[str, ...] = ("jpeg",)) -> torch.Tensor:
    """Apply `policy` to a float [0,255] NCHW batch; returns a new tensor on the same device.

    `p`: the fraction of images that get the colour (stain, robust) and camera (robust) part; flips, rotation and
    zoom apply to every image. Below 1 the others keep their true colour and texture. `geometry=False`: the batch
    is already flipped/rotated (`flips_and_rotation`), only the colour/camera part is drawn. `camera=False`: the
    colour part alone (stain, white balance, exposure), without the policy's blur, noise, JPEG or sensor defects.
    `codecs`: what the camera part's re-encoding step draws from (`CODECS`; one per batch)."""
    check_policy(policy)
    check_codecs(codecs)
    if zoom < 1.0:
        raise ValueError(f"zoom must be >= 1.0 (the largest magnification factor; 1.0 = off), got {zoom}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1] (the fraction of images that get colour/camera augmentation), got {p}")
    if policy == "none":
        return x
    if geometry:
        x = flips_and_rotation(x, generator, zoom=zoom)
    if policy == "study" or p == 0.0:
        return x.clamp_(0, 255)
    y = colour_jitter(x, generator, strength)
    if policy in ("lab", "lab_defects", "lab_sensor", "lab_dust_levels"):
        y = colour_response(y, generator, strength)
    if camera and policy in CAMERA_POLICIES:
        y = camera_artefacts(y, generator, strength, codecs=codecs)
    if camera and policy == "lab_defects":
        y = optics_defects(y, generator, strength)
    if camera and policy in ("lab_sensor", "lab_dust_levels"):
        y = sensor_defects(y, generator, strength)
    if camera and policy == "lab_dust_levels":
        y = dust_and_levels(y, generator, strength)
    if p < 1.0:
        y = torch.where((_rand(x.shape[0], x, generator, 0, 1) < p).view(-1, 1, 1, 1), y, x)
    return y.clamp_(0, 255)


def _rand(n: int, x: torch.Tensor, g: torch.Generator | None, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=g, device="cpu").to(x.device, x.dtype) * (hi - lo) + lo


def _noise(shape: tuple[int, ...], x: torch.Tensor, g: torch.Generator | None, uniform: bool = False) -> torch.Tensor:
    """Standard normal (or uniform [0, 1)) noise of `shape` on x's device: drawn on the CPU from `g`, so a seeded
    run repeats exactly; without `g` (a GPU), drawn there, seeded by torch.manual_seed."""
    if g is not None:
        return (torch.rand if uniform else torch.randn)(shape, generator=g, device="cpu").to(x)
    return (torch.rand if uniform else torch.randn)(shape, device=x.device, dtype=x.dtype)


def flips_and_rotation(x: torch.Tensor, g: torch.Generator | None, max_degrees: float = 180.0,
                       zoom: float = 1.0) -> torch.Tensor:
    """Random flips and any rotation: a cell in a smear has no up (reflection padding keeps the field natural).
    With zoom > 1 each image is also magnified by a factor in [1/zoom, zoom] (log-uniform)."""
    n = x.shape[0]
    angle = _rand(n, x, g, -max_degrees, max_degrees) * math.pi / 180
    sx = torch.where(_rand(n, x, g, 0, 1) < 0.5, -1.0, 1.0).to(x)
    sy = torch.where(_rand(n, x, g, 0, 1) < 0.5, -1.0, 1.0).to(x)
    if zoom > 1.0:  # the grid maps output to input coordinates: sampling a span of 1/m magnifies by m
        inv = torch.exp(-_rand(n, x, g, -math.log(zoom), math.log(zoom)))
        sx, sy = sx * inv, sy * inv
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, torch.zeros_like(cos)], 1),
                         torch.stack([sin * sx, cos * sy, torch.zeros_like(cos)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def colour_jitter(x: torch.Tensor, g: torch.Generator | None, strength: float = 1.0,
                  hue_groups: int = 4) -> torch.Tensor:
    """Stain and illumination: HSV hue shift (as a lab's stain drifts; per group of the batch, since torchvision
    takes one factor per call), then per-image saturation, gamma, contrast and brightness."""
    n = x.shape[0]
    s = strength
    y = (x / 255.0).clamp(0, 1)
    parts = []
    for chunk in y.chunk(min(hue_groups, n)):
        factor = float(_rand(1, x, g, -0.12 * s, 0.12 * s)[0])
        parts.append(TF.adjust_hue(chunk, factor))
    y = torch.cat(parts)
    sat = _rand(n, x, g, 1 - 0.4 * s, 1 + 0.4 * s).view(-1, 1, 1, 1)
    gray = (y * _LUMA.to(y).view(1, 3, 1, 1)).sum(1, keepdim=True)
    y = (gray + (y - gray) * sat).clamp(0, 1)
    y = y ** _rand(n, x, g, 1 - 0.2 * s, 1 + 0.2 * s).view(-1, 1, 1, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * _rand(n, x, g, 1 - 0.3 * s, 1 + 0.3 * s).view(-1, 1, 1, 1) + mean
    return (y * _rand(n, x, g, 1 - 0.3 * s, 1 + 0.3 * s).view(-1, 1, 1, 1)).clamp(0, 1) * 255.0


def colour_response(x: torch.Tensor, g: torch.Generator | None, strength: float = 1.0) -> torch.Tensor:
    """Another lab's stain batch and camera, per image: each dye's concentration ×[0.6, 1.6], red and blue gains
    ×[0.75, 1.33] and green ×[0.85, 1.18] (white balance, colour temperature, colour cast), exposure ×[0.5, 1.7]
    with clipping, all log-uniform (wider than the suite's severities, so those are inside what was seen)."""
    from . import colour

    n, s = x.shape[0], strength

    def logu(hi: float) -> torch.Tensor:
        r = math.log(hi) * s
        return torch.exp(_rand(n, x, g, -r, r))

    y = colour.stain_concentration(x / 255.0, logu(1.6), logu(1.6))
    gains = torch.stack([logu(1.33), logu(1.18), logu(1.33)], 1) * logu(1.7).view(-1, 1)
    return colour.camera_gains(y, gains) * 255.0


def camera_artefacts(x: torch.Tensor, g: torch.Generator | None, strength: float = 1.0, p: float = 0.5,
                     codecs: tuple[str, ...] = ("jpeg",)) -> torch.Tensor:
    """Each artefact hits a random half of the batch, so clean images stay in the mix. The re-encoded images go
    through one of `codecs` (drawn per batch): an archive another codec wrote has other artefacts than JPEG's."""
    n, _, h, w = x.shape
    pick = lambda: (_rand(n, x, g, 0, 1) < p).view(-1, 1, 1, 1)  # noqa: E731
    # Gaussian blur, sigma up to 2.5 px (one sigma per batch keeps it a single conv)
    sigma = float(_rand(1, x, g, 0.3, 2.5 * strength)[0])
    radius = max(1, int(3 * sigma))
    k = torch.exp(-(torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype) ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    blurred = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    blurred = F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    x = torch.where(pick(), blurred, x)
    # down- then up-scaling (a lower-resolution camera)
    scale = float(_rand(1, x, g, 0.4, 0.9)[0])
    small = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
    x = torch.where(pick(), F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False), x)
    # sensor noise, sigma up to 0.08 of the range
    noise_sigma = _rand(n, x, g, 0, 0.08 * strength).view(-1, 1, 1, 1) * 255
    noise = _noise(x.shape, x, g) * noise_sigma
    x = torch.where(pick(), x + noise, x)
    # re-encoding at quality 5-60 (JPEG, or a codec drawn from `codecs`)
    encode_mask = pick().view(-1)
    if bool(encode_mask.any()):
        quality = int(_rand(1, x, g, 5, 60)[0])
        codec = codecs[int(_rand(1, x, g, 0, len(codecs))[0])] if len(codecs) > 1 else codecs[0]
        idx = torch.nonzero(encode_mask).view(-1)
        u8 = x[idx].clamp(0, 255).round().to(torch.uint8)
        if codec == "webp":
            out = webp_round_trip(u8, quality)
        else:
            try:
                out = jpeg_round_trip(u8, quality)
            except RuntimeError:  # no GPU codec: go through the CPU
                out = jpeg_round_trip(u8.cpu(), quality)
        x = x.clone()
        x[idx] = torch.stack([o.to(x.device) for o in out]).to(x.dtype)
    return x


def jpeg_round_trip(u8: torch.Tensor, quality: int) -> list[torch.Tensor]:
    """uint8 NCHW images → each after JPEG at `quality`, on their device: on a GPU nvJPEG both ways (the decoder
    takes its bytes from host memory), on the CPU libjpeg-turbo."""
    encoded = [JpegEncoder(im).to_tensor(quality=quality).cpu() for im in u8]
    return decode_jpeg(encoded, device=u8.device)


def webp_round_trip(u8: torch.Tensor, quality: int) -> list[torch.Tensor]:
    """uint8 NCHW images → each after lossy WebP at `quality`, on their device. libwebp (through Pillow) runs on the
    CPU at a few ms per 224 px image, ten times JPEG's cost, so the images go through a thread pool (Pillow lets go of
    the GIL while it encodes and decodes)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    def one(im: torch.Tensor) -> torch.Tensor:
        buffer = io.BytesIO()
        Image.fromarray(im.permute(1, 2, 0).contiguous().numpy()).save(buffer, "WEBP", quality=quality)
        return torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1).to(u8.device)

    images = list(u8.cpu())
    if len(images) < 2:
        return [one(im) for im in images]
    with ThreadPoolExecutor(max_workers=min(len(images), os.cpu_count() or 1)) as pool:
        return list(pool.map(one, images))


def motion_streak(x: torch.Tensor, length: int, along_rows: bool = True) -> torch.Tensor:
    """NCHW averaged over a streak of `length` pixels along rows (or columns), edges replicated; an even length
    leans left (up) by half a pixel."""
    before = (length - 1) // 2
    kernel = torch.full((x.shape[1], 1, 1, length), 1.0 / length, dtype=x.dtype, device=x.device)
    pad = (before, length - 1 - before, 0, 0)
    if not along_rows:
        kernel, pad = kernel.transpose(2, 3), (0, 0) + pad[:2]
    return F.conv2d(F.pad(x, pad, mode="replicate"), kernel, groups=x.shape[1])


def pixelate(x: torch.Tensor, block: int) -> torch.Tensor:
    """NCHW replaced by the means of `block` × `block` tiles, each mean repeated over its tile (a low-resolution
    sensor upscaled without interpolation); partial tiles at the right and bottom edges average what they hold."""
    h, w = x.shape[-2:]
    return F.interpolate(F.avg_pool2d(x, block, ceil_mode=True), scale_factor=block, mode="nearest")[..., :h, :w]


def shift_plane(plane: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """(N, H, W) moved by (dx, dy) pixels, linear interpolation, edges replicated."""
    n, h, w = plane.shape
    ys = torch.arange(h, dtype=plane.dtype, device=plane.device).view(h, 1).expand(h, w) - dy
    xs = torch.arange(w, dtype=plane.dtype, device=plane.device).view(1, w).expand(h, w) - dx
    grid = torch.stack([(2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1], -1).expand(n, h, w, 2)
    return F.grid_sample(plane[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]


def optics_defects(x: torch.Tensor, g: torch.Generator | None, strength: float = 1.0, p: float = 0.2) -> torch.Tensor:
    """Defects of everyday microscope cameras beyond `camera_artefacts`, each on a random fifth of the batch:
    motion blur (a 3, 5 or 7 px streak: the stage moving during the exposure), the `sensor_defects`, veiling glare
    (up to 40 % of white light over the field) and a display gain up to ×1.5 with clipping (a software brightness
    setting)."""
    n = x.shape[0]
    s = strength
    pick = lambda: (_rand(n, x, g, 0, 1) < p).view(-1, 1, 1, 1)  # noqa: E731
    # motion blur along rows or columns (the batch is already rotated at random)
    length = 2 * int(_rand(1, x, g, 1, 1 + 3 * s)[0]) + 1
    along_rows = bool(_rand(1, x, g, 0, 1)[0] < 0.5)
    x = torch.where(pick(), motion_streak(x, length, along_rows), x)
    x = sensor_defects(x, g, strength, p)
    # veiling glare, then a display gain
    glare = _rand(n, x, g, 0, 0.4 * s).view(-1, 1, 1, 1)
    x = torch.where(pick(), x * (1 - glare) + 255.0 * glare, x)
    gain = _rand(n, x, g, 1.0, 1.0 + 0.5 * s).view(-1, 1, 1, 1)
    return torch.where(pick(), (x * gain).clamp(0, 255), x)


def sensor_defects(x: torch.Tensor, g: torch.Generator | None, strength: float = 1.0, p: float = 0.2) -> torch.Tensor:
    """A cheap camera's sensor, each defect on a random fifth of the batch: shot noise (a dim lamp: noise that grows
    with the signal, 20-200 photons at white), impulse noise (up to 1 % dead or hot pixels), pixelation (block
    averages of 2-3 px: a low-resolution sensor upscaled without interpolation) and red and blue planes 0.5-2 px out
    of register (lateral chromatic aberration). Nothing here brightens the field or clips it."""
    n, _, h, w = x.shape
    s = strength
    pick = lambda: (_rand(n, x, g, 0, 1) < p).view(-1, 1, 1, 1)  # noqa: E731
    # shot noise: Poisson photon counts, as a Gaussian of variance value × 255 / photons-at-white
    photons = torch.exp(_rand(n, x, g, math.log(20), math.log(200))).view(-1, 1, 1, 1) / max(s, 1e-6)
    noise = _noise(x.shape, x, g)
    x = torch.where(pick(), x + noise * (x.clamp(0, 255) * 255.0 / photons).sqrt(), x)
    # impulse noise: pixels stuck black or white
    u = _noise((n, 1, h, w), x, g, uniform=True)
    frac = _rand(n, x, g, 0, 0.01 * s).view(-1, 1, 1, 1)
    stuck = torch.where(u < frac / 2, 0.0, torch.where(u > 1 - frac / 2, 255.0, -1.0))
    x = torch.where(pick() & (stuck >= 0), stuck.expand_as(x), x)
    # pixelation
    block = int(_rand(1, x, g, 2, 4)[0])
    x = torch.where(pick(), pixelate(x, block), x)
    # red and blue planes out of register, in opposite directions
    shift = float(_rand(1, x, g, 0.5, 0.5 + 1.5 * s)[0])
    angle = float(_rand(1, x, g, 0, 2 * math.pi)[0])
    dx, dy = shift * math.cos(angle), shift * math.sin(angle)
    shifted = torch.stack([shift_plane(x[:, 0], dx, dy), x[:, 1], shift_plane(x[:, 2], -dx, -dy)], 1)
    return torch.where(pick(), shifted, x)


def dust_light(n: int, h: int, w: int, count: int, g: torch.Generator | None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, passed: tuple[float, float] = (0.05, 0.55)) -> torch.Tensor:
    """(n, 1, h, w) fraction of the light left by `count` specks of dust or debris per image: discs of radius 2-6 px
    at 224 px (scaled with the field) at random places, each passing a fraction of the light drawn uniformly from
    `passed`, edges anti-aliased. Dust on the slide, the coverslip or the camera's window is grey; a network that has
    only seen clean fields may read a small dark disc as a small dark nucleus."""
    scale = min(h, w) / 224.0
    centre_y = torch.rand(n, count, 1, 1, generator=g) * h
    centre_x = torch.rand(n, count, 1, 1, generator=g) * w
    radius = (2.0 + 4.0 * torch.rand(n, count, 1, 1, generator=g)) * scale
    passed = passed[0] + (passed[1] - passed[0]) * torch.rand(n, count, 1, 1, generator=g)
    yy = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1) + 0.5
    xx = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w) + 0.5
    light = torch.ones(n, 1, h, w)
    for i in range(count):
        sl = slice(i, i + 1)
        distance = ((yy - centre_y[:, sl]) ** 2 + (xx - centre_x[:, sl]) ** 2).sqrt()
        cover = (radius[:, sl] - distance + 0.5).clamp(0, 1)
        light = light * (1 - (1 - passed[:, sl]) * cover)
    return light.to(device, dtype)


def auto_levels(x: torch.Tensor, clip: torch.Tensor | float) -> torch.Tensor:
    """The camera software's automatic levels: per image, the darkest and the brightest `clip` % of the values (all
    three channels together) go to black and white and the rest is stretched linearly between them. On the pale
    Taleqani fields this is a contrast stretch of ×1.3-3.9."""
    n = x.shape[0]
    if n == 0:
        return x.clone()
    flat = x.reshape(n, -1)
    m = flat.shape[1]
    q = torch.as_tensor(clip, dtype=torch.float64).reshape(-1).expand(n) / 100.0
    out = torch.empty_like(flat)
    for i in range(n):
        k = int(round(float(q[i]) * (m - 1)))
        low = flat[i].kthvalue(k + 1).values
        high = flat[i].kthvalue(m - k).values
        out[i] = ((flat[i] - low) * (255.0 / (high - low).clamp_min(1.0))).clamp(0, 255)
    return out.reshape_as(x)


def dust_and_levels(x: torch.Tensor, g: torch.Generator | None, strength: float = 1.0, p: float = 0.2) -> torch.Tensor:
    """Each on a random fifth of the batch: 1-16 specks of dust or debris passing 5-55 % of the light (`dust_light`,
    in linear light) and the camera software's automatic levels clipping 0-2 % at each end (`auto_levels`)."""
    from . import colour

    n, _, h, w = x.shape
    s = strength
    x = x.clone()
    dusty = _rand(n, x, g, 0, 1) < p
    count = int(_rand(1, x, g, 1, 1 + 16 * s)[0])
    light = dust_light(int(dusty.sum()), h, w, count, g, x.device, x.dtype)
    x[dusty] = colour.scale_light(x[dusty] / 255.0, light) * 255.0
    levelled = _rand(n, x, g, 0, 1) < p
    clip = _rand(n, x, g, 0, 2 * s)
    x[levelled] = auto_levels(x[levelled], clip[levelled])
    return x


def augment_images(images_nhwc, policy: str, seed: int, strength: float = 1.0, zoom: float = 1.0,
                   batch_size: int = 64, codecs: tuple[str, ...] = ("jpeg",)):
    """uint8 NHWC images → the same images under `policy` (every image gets the colour/camera part), uint8 NHWC,
    seeded: what the network saw in training, for the out-of-distribution guard's reference (`leukray.ood`)."""
    import numpy as np

    check_policy(policy)
    g = torch.Generator().manual_seed(int(seed))
    out = np.empty_like(images_nhwc)
    for i in range(0, len(images_nhwc), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc[i:i + batch_size])).permute(0, 3, 1, 2).float()
        y = augment_batch(x, policy, g, strength, zoom, p=1.0, codecs=codecs)
        out[i:i + len(y)] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out

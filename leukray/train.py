"""The training function: one code path for `leukray train` and for every Ray Tune trial.

Read top to bottom: prepare_data (list → split manifest → decode once into a cache) → fit (epochs of augment +
optimise, validate, early stop, report) → finish (temperature on val, test metrics, plots, model package).
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np
import pyarrow as pa
import torch
import yaml
import torch.nn.functional as F
from pydantic import Field, field_validator

from . import CLASSES, storage
from .augment import CAMERA_POLICIES, CODECS, POLICIES, augment_batch, augment_images, check_codecs, check_policy, flips_and_rotation
from .colour import other_labs, signature_envelope
from .config import StorageOptions, StrictModel, dump_config
from .data import DataError, cached_decode, content_hash, list_labelled_folder, read_all, warn_unreadable
from .model import LeukNet, ModelConfig, build_model, check_colour_norm
from .ood import OODConfig, fit_guard, save_reference, split_outputs
from .perturb import degraded_copy
from .registry import export_onnx, library_versions, write_package
from .split import SplitConfig, load_manifest, make_manifest, manifest_hash, save_manifest, summarize
from .inference import (OpenVINOModel, Predictor, TorchModel, ViewPolicy, default_threads, openvino_here,
                        predict_outputs, softmax)
from .tta import check_tta, view_ids


class DataConfig(StrictModel):
    root: str | None = None
    """Labelled image folder, local or s3:// (class sub-folders)."""
    limit_per_class: int | None = None
    """Use only the first N images of each class (quick runs)."""


class TrainConfig(StrictModel):
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    image_size: int = Field(224, ge=32, le=1024)
    augment: str = "stain"
    """Training augmentation policy (`leukray.augment`): none | study | stain | robust | lab | lab_defects | lab_sensor |
    lab_dust_levels."""
    augment_strength: float = Field(1.0, ge=0.0, le=4.0)
    augment_zoom: float = Field(1.0, ge=1.0, le=4.0)
    """Magnification jitter: each training image is zoomed by a factor in [1/zoom, zoom]; 1.0 = off."""
    augment_p: float = Field(1.0, ge=0.0, le=1.0)
    """Fraction of training images that get the policy's colour/camera part (flips, rotation, zoom: all); 1.0 = all."""
    augment_codecs: tuple[str, ...] = ("jpeg",)
    """The codecs the policy's re-encoding step draws from, one per batch (`leukray.augment.CODECS`: jpeg | webp);
    needs a policy with a camera part (robust, lab, …)."""

    @field_validator("augment_codecs", mode="before")
    @classmethod
    def _codecs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"augment_codecs: expected a codec or a list of them ({', '.join(CODECS)}), got {value!r}")
        return check_codecs(value)
    consistency: float = Field(0.0, ge=0.0, le=100.0)
    """Weight of a feature-consistency term: each batch also goes through the policy's colour/camera part in full,
    and its pooled features are pulled (cosine) toward those of the batch as trained, so another lab's image lands
    where its own-lab twin does (for the classifier and the guard alike); doubles the cost of a step. 0 = off."""
    consistency_ce: float = Field(0.0, ge=0.0, le=10.0)
    """Weight of the classification loss on that fully shifted copy too (needs `consistency` > 0): the head learns
    to answer under another lab's shift, not only the features to move less; 0 = the copy is only pulled."""
    consistency_ce_copy: Literal["shifted", "colour"] = "shifted"
    """The copy `consistency_ce` classifies: `shifted` = the consistency term's copy (colour and camera part);
    `colour` = a third copy under the colour part alone (another lab's white balance, exposure and stain batch), so
    the head learns to answer under another lab's colours but not to answer blurred or noisy fields the guard should
    flag; a third pass per step."""
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1, le=4096)
    optimizer: Literal["adam", "adamw"] = "adamw"
    lr: float = Field(3e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0, le=100.0)
    early_stopping_patience: int = Field(6, ge=0)
    """Stop after this many epochs without improvement of `monitor`; 0 = never."""
    monitor: Literal["val_loss", "val_accuracy", "val_macro_f1"] = "val_loss"
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    """Validate, select and ship an exponential moving average of the weights (and BN statistics), updated every
    step; 0 = off. Heavily augmented fine-tuning on a few thousand images moves val accuracy by ±2 % from epoch to
    epoch; the average is steadier and usually better. 0.995 ≈ a 200-step (3-epoch) horizon at 70 steps/epoch."""
    device: str = "auto"
    amp: bool = True
    """bfloat16 autocast on CUDA."""
    channels_last: bool = True
    num_threads: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    tta: str = "dihedral8"
    """Test-time augmentation the package is calibrated, measured and shipped with (`leukray.tta`): none | flips4 |
    dihedral8 | adaptive (one view; the 8 dihedral views only below a cascade threshold fitted on val with a
    temperature per path, as `leukray calibrate --tta adaptive` fits it; configs/train.yaml's choice).
    Epoch-by-epoch validation stays single-view (it only ranks epochs)."""
    ood: OODConfig = Field(default_factory=OODConfig)
    """The out-of-distribution guard fitted into the package (`leukray.ood`)."""
    storage: StorageOptions = Field(default_factory=StorageOptions)

    def model_post_init(self, _: Any) -> None:
        check_policy(self.augment)
        if self.augment_codecs != ("jpeg",) and self.augment not in CAMERA_POLICIES:
            raise ValueError(f"augment_codecs={list(self.augment_codecs)!r} needs a policy that re-encodes; "
                             f"augment={self.augment!r} does not (allowed with augment_codecs: "
                             f"{', '.join(CAMERA_POLICIES)})")
        if self.consistency > 0 and self.augment in ("none", "study"):
            raise ValueError(f"consistency={self.consistency} needs a colour/camera policy to be consistent under; "
                             f"augment={self.augment!r} has none (allowed with consistency: "
                             f"{', '.join(p for p in POLICIES if p not in ('none', 'study'))})")
        if self.consistency_ce > 0 and self.consistency == 0:
            raise ValueError(f"consistency_ce={self.consistency_ce} needs consistency > 0 (the shifted copy it "
                             f"classifies is made only for the consistency term)")
        if self.consistency_ce_copy != "shifted" and self.consistency_ce == 0:
            raise ValueError(f"consistency_ce_copy={self.consistency_ce_copy!r} needs consistency_ce > 0 (it names "
                             f"the copy that loss classifies)")
        check_tta(self.tta)
        check_colour_norm(self.model.colour_norm)


UNREADABLE = "unreadable"
"""The split of a dataset file that does not decode: listed in the manifest, left out of every split."""


@dataclass
class PreparedData:
    root: str
    manifest: pa.Table
    manifest_uri: str | None
    images: np.ndarray
    """(N, S, S, 3) uint8, manifest order (memory-mapped cache)."""
    labels: np.ndarray
    splits: np.ndarray
    """train | val | test per manifest row; UNREADABLE for a file that does not decode (left out everywhere)."""
    unreadable: dict[str, str] = field(default_factory=dict)
    """Files of the dataset left out because they do not decode, with the reason (recorded in the model card)."""

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    @property
    def manifest_hash(self) -> str:
        return manifest_hash(self.manifest)

    def class_counts(self, split: str = "train") -> dict[str, int]:
        idx = self.indices(split)
        return {c: int((self.labels[idx] == i).sum()) for i, c in enumerate(CLASSES)}


def log(msg: str) -> None:
    print(f"[leukray] {msg}", file=sys.stderr, flush=True)


def prepare_data(cfg: TrainConfig, manifest_uri: str | None = None) -> PreparedData:
    """List the dataset, reuse or create the split manifest, and decode every image once (cached)."""
    if not cfg.data.root:
        raise DataError("no dataset: set data.root in the config or pass --data DIR_OR_URI")
    so = cfg.storage
    listing = list_labelled_folder(cfg.data.root, so)
    paths, labels = listing.paths, listing.labels
    if cfg.data.limit_per_class:
        keep = [i for c in CLASSES for i in [j for j, l in enumerate(labels) if l == c][: cfg.data.limit_per_class]]
        keep.sort()
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    manifest_uri = cfg.split.manifest or manifest_uri
    blobs = None
    if manifest_uri and storage.exists(manifest_uri, so):
        table = load_manifest(manifest_uri, so)
        have, want = set(table["path"].to_pylist()), set(paths)
        if have != want:
            raise DataError(
                f"split manifest {manifest_uri} does not match {cfg.data.root}: {len(want - have)} file(s) not in "
                f"the manifest (e.g. {sorted(want - have)[:3]}), {len(have - want)} in the manifest but not in the "
                f"dataset (e.g. {sorted(have - want)[:3]}); remove the manifest to re-split or set split.manifest")
        log(f"split: reusing {manifest_uri}")
    else:
        blobs = read_all(cfg.data.root, paths, so)
        hashes = [content_hash(b) for b in blobs]
        table = make_manifest(paths, labels, hashes, blobs, cfg.split)
        if manifest_uri:
            save_manifest(table, manifest_uri, so)
            log(f"split: wrote {manifest_uri}")
    table = table.sort_by("path")
    images, unreadable = cached_decode(cfg.data.root, table["path"].to_pylist(), table["hash"].to_pylist(),
                                       cfg.image_size, so, blobs=None if blobs is None else dict(zip(paths, blobs)))
    warn_unreadable(cfg.data.root, unreadable)
    label_idx = np.array([CLASSES.index(c) for c in table["class"].to_pylist()], dtype=np.int64)
    splits = np.array([UNREADABLE if p in unreadable else s for p, s in
                       zip(table["path"].to_pylist(), table["split"].to_pylist())])  # in the manifest, used nowhere
    data = PreparedData(cfg.data.root, table, manifest_uri, images, label_idx, splits, unreadable)
    n = {split: len(data.indices(split)) for split in ("train", "val", "test")}
    s = summarize(table)
    log(f"data: {len(paths) - len(unreadable)} images; train {n['train']}, val {n['val']}, test {n['test']}; "
        f"{s['duplicate_groups']} duplicate groups ({s['images_in_duplicate_groups']} images) kept within one split"
        + (f"; {len(unreadable)} unreadable left out" if unreadable else ""))
    for split in ("train", "val"):
        if n[split] == 0:
            raise DataError(f"{cfg.data.root}: the {split} split is empty ({len(paths) - len(unreadable)} readable "
                            f"images); add images or change split fractions")
    return data


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use 'auto' or 'cpu'")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"device={name!r} is not supported; allowed: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def predict_logits(model: LeukNet, images: np.ndarray, device: torch.device, batch_size: int = 128,
                   channels_last: bool = True, amp: bool = True) -> np.ndarray:
    """(N, K) float32 logits of one view (`leukray.inference.predict_outputs`): the epochs' validation metrics."""
    return predict_outputs(model, images, device, batch_size, channels_last, amp)[:, :len(CLASSES)]


def guard_reference(features_of: Callable[[np.ndarray], np.ndarray], images: np.ndarray, ood: OODConfig,
                    augment: str, strength: float, zoom: float, seed: int,
                    codecs: tuple[str, ...] = ("jpeg",)) -> tuple[np.ndarray, dict[str, Any]]:
    """The out-of-distribution guard's reference features: the training images as they are, then
    `ood.reference_colour_copies` copies of each in another lab's colours, `ood.degraded_copies` under one camera
    defect each (`leukray.perturb.degraded_copy`) and `ood.augmented_copies` copies under
    the training policy (`leukray.ood`: what the network was trained on counts as in distribution), and how they
    were made, for the card."""
    copies = ood.augmented_copies if augment != "none" else 0
    parts = [features_of(images)]
    g = torch.Generator().manual_seed(seed + 4000)
    for _ in range(ood.reference_colour_copies):
        parts.append(features_of(other_labs(images, g)))
    for c in range(ood.degraded_copies):
        parts.append(features_of(degraded_copy(images, seed=seed + 5000 + c)))
    for c in range(copies):
        parts.append(features_of(augment_images(images, augment, seed=seed + 1000 + c, strength=strength, zoom=zoom,
                                                codecs=codecs)))
    return np.concatenate(parts), {"n_images": int(len(images)), "colour_copies": ood.reference_colour_copies,
                                   "degraded_copies": ood.degraded_copies, "augmented_copies": copies,
                                   "augment": augment, "augment_strength": strength, "augment_zoom": zoom,
                                   "augment_codecs": list(codecs)}


OPTICS_DEFOCUS_RADIUS = (10.0, 14.0)
"""The optics check's out-of-focus copies: disc radius in px at 224 px, well past the robustness suite's strongest
blur (Gaussian σ 3 px, about a disc of radius 6)."""


def optics_images(images: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    """The training images as the wrong optics show them, one batch per kind, for the guard's optics check
    (`leukray.ood`): a ×2 weaker objective (each image at half size beside three other training images at half size,
    the field such an objective shows), a ×2 stronger one (the centre enlarged ×2), and a camera's defocus well past
    what the network is trained and tested to answer through."""
    from PIL import Image

    from .perturb import apply_perturbation
    from .synth import defocus_field

    rng = np.random.default_rng(seed + 6000)
    n, size = len(images), images.shape[1]
    half = size // 2

    def wide(i: int) -> np.ndarray:
        canvas = Image.new("RGB", (2 * half, 2 * half))
        for k, j in enumerate([i, *rng.integers(n, size=3)]):
            tile = Image.fromarray(images[j]).resize((half, half), Image.Resampling.BILINEAR)
            canvas.paste(tile, ((k % 2) * half, (k // 2) * half))
        return np.asarray(canvas.resize((size, size), Image.Resampling.BILINEAR))

    yield np.stack([wide(i) for i in range(n)])
    yield np.concatenate([apply_perturbation(images[i:i + 256], "magnification", 2.0, seed=seed)
                          for i in range(0, n, 256)])
    yield np.stack([np.asarray(defocus_field(a, rng, size, OPTICS_DEFOCUS_RADIUS)) for a in images])


def optics_reference(features_of: Callable[[np.ndarray], np.ndarray], images: np.ndarray, ood: OODConfig,
                     seed: int) -> np.ndarray | None:
    """The optics check's reference features (`optics_images`), or None when the check is off."""
    if not ood.optics_check or ood.method != "knn":
        return None
    return np.concatenate([features_of(batch) for batch in optics_images(images, seed + 7000)])


def colour_envelopes(train_images: np.ndarray | None, val_images: np.ndarray, ood: OODConfig, seed: int,
                     reference: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The colour check's reference (training images, or an existing `reference`; None when the colour check is
    off) and the colour and structure checks' threshold set (validation images), each under other cameras' and
    stain batches' colours (`leukray.colour.signature_envelope`); (None, None) when both checks are off."""
    if not (ood.colour_check or ood.structure_check):
        return None, None
    if reference is None and ood.colour_check:
        reference = signature_envelope(train_images, seed + 2000, ood.colour_copies)
    return reference, signature_envelope(val_images, seed + 3000, ood.colour_copies)


def packaging_model(model: LeukNet, cfg: TrainConfig) -> Any:
    """What the trained network is calibrated, guarded and tested with. On a CPU: its ONNX graph under OpenVINO
    fp32, as `leukray calibrate` and scoring run it (outputs within ~3e-4 of PyTorch's, ~4.6x faster there: the
    guard's reference is 8 views of two copies of every training image; bench/package_views.py); elsewhere PyTorch."""
    device = next(model.parameters()).device
    if not openvino_here(device):
        return TorchModel(model, device, cfg.eval_batch_size, channels_last=cfg.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model, cfg.image_size, path)
        with open(path, "rb") as fh:
            onnx_bytes = fh.read()
    return OpenVINOModel(onnx_bytes, cfg.num_threads or default_threads(), "f32")


@dataclass
class FitResult:
    model: LeukNet
    history: list[dict[str, Any]]
    best_epoch: int
    best: dict[str, Any]
    stopped_early: bool = False
    state: dict[str, Any] = field(default_factory=dict)


EpochCallback = Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None]


def _lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    warm = cfg.warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    total = max(1, cfg.epochs * steps_per_epoch - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / total)))


def fit(cfg: TrainConfig, data: PreparedData, on_epoch: EpochCallback | None = None,
        resume: dict[str, Any] | None = None, verbose: bool = True) -> FitResult:
    """Train on the train split, validate each epoch, keep the best epoch's weights.

    `on_epoch(metrics, checkpoint)` is called after every epoch; `checkpoint()` returns the full training state,
    which `resume=` accepts to continue exactly where it stopped (Tune uses both)."""
    from .metrics import classification_metrics

    check_policy(cfg.augment)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    gen = seed_everything(cfg.seed)
    device = select_device(cfg.device)
    model = build_model(cfg.model, len(CLASSES), cfg.storage, verbose=verbose and resume is None).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params_decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    params_no = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": params_decay, "weight_decay": cfg.weight_decay}, {"params": params_no, "weight_decay": 0.0}]
    opt = (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam)(groups, lr=cfg.lr)
    train_idx, val_idx = data.indices("train"), data.indices("val")
    steps_per_epoch = max(1, len(train_idx) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(cfg, s, steps_per_epoch))
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay),
                                               use_buffers=True) if cfg.ema_decay else None)
    shipped = ema.module if ema is not None else model  # what is validated, selected and packaged
    use_amp = cfg.amp and device.type == "cuda"
    # On a GPU the decoded training set lives on the device: no per-batch host transfer, augmentation there too.
    train_images = torch.from_numpy(np.ascontiguousarray(data.images[train_idx]))
    if device.type == "cuda":
        train_images = train_images.to(device)
    train_labels = torch.from_numpy(data.labels[train_idx]).to(device)
    val_images = np.ascontiguousarray(data.images[val_idx])
    val_labels = data.labels[val_idx]

    history: list[dict[str, Any]] = []
    start_epoch, best_score, best_epoch, best_state, bad_epochs = 1, None, 0, None, 0
    if resume:
        model.load_state_dict(resume["model"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        gen.set_state(resume["generator"])
        if "torch_rng" in resume:  # dropout draws from torch's global generator
            torch.set_rng_state(resume["torch_rng"])
        history = list(resume["history"])
        start_epoch = resume["epoch"] + 1
        best_score, best_epoch, bad_epochs = resume["best_score"], resume["best_epoch"], resume["bad_epochs"]
        best_state = resume["best_state"]
    sign = 1.0 if cfg.monitor == "val_loss" else -1.0

    epoch = start_epoch - 1
    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(train_idx), generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        n_batches = max(1, len(perm) // cfg.batch_size) if len(perm) >= cfg.batch_size else 1
        last_progress = t0
        for b in range(n_batches):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = train_images[idx.to(train_images.device)].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
            y = train_labels[idx.to(train_labels.device)]
            g = gen if device.type == "cpu" else None
            if cfg.consistency > 0:  # one geometry; as trained, shifted in full (and in colours only, for that loss)
                x = flips_and_rotation(x, g, zoom=cfg.augment_zoom)
                shifted = augment_batch(x, cfg.augment, g, cfg.augment_strength, p=1.0, geometry=False,
                                        codecs=cfg.augment_codecs)
                copies = [augment_batch(x, cfg.augment, g, cfg.augment_strength, p=cfg.augment_p, geometry=False,
                                        codecs=cfg.augment_codecs), shifted]
                if cfg.consistency_ce > 0 and cfg.consistency_ce_copy == "colour":  # a third: colours only
                    copies.append(augment_batch(x, cfg.augment, g, cfg.augment_strength, p=1.0, geometry=False,
                                                camera=False))
                x = torch.cat(copies)
            else:
                x = augment_batch(x, cfg.augment, g, cfg.augment_strength, cfg.augment_zoom, cfg.augment_p,
                                  codecs=cfg.augment_codecs)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                pooled = model.pooled(x)
                all_logits = model.head(pooled)
                logits = all_logits[:len(y)]
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                if cfg.consistency_ce > 0:  # the last copy: shifted in full, or colours only
                    loss = loss + cfg.consistency_ce * F.cross_entropy(all_logits[-len(y):].float(), y,
                                                                       label_smoothing=cfg.label_smoothing)
                if cfg.consistency > 0:  # the shifted copy pulled toward the batch as trained
                    own, shifted = pooled[:len(y)].float().detach(), pooled[len(y):2 * len(y)].float()
                    loss = loss + cfg.consistency * (1 - F.cosine_similarity(shifted, own, dim=1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            total_loss += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if verbose and time.time() - last_progress > 60:  # slow epochs (CPU) still show life
                last_progress = time.time()
                log(f"epoch {epoch}: batch {b + 1}/{n_batches}  loss {total_loss / seen:.4f}  "
                    f"{seen / (time.time() - t0):.1f} img/s")
        val_logits = predict_logits(shipped, val_images, device, cfg.eval_batch_size, cfg.channels_last, cfg.amp)
        val_prob = softmax(val_logits, 1.0)
        vm = classification_metrics(val_labels, val_prob, CLASSES)
        val_loss = float(F.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val_labels)))
        row = {
            "epoch": epoch, "lr": opt.param_groups[0]["lr"],
            "train_loss": total_loss / max(1, seen), "train_accuracy": correct / max(1, seen),
            "val_loss": val_loss, "val_accuracy": vm["accuracy"],
            "val_macro_precision": vm["macro"]["precision"], "val_macro_recall": vm["macro"]["recall"],
            "val_macro_f1": vm["macro"]["f1"], "epoch_time_s": time.time() - t0,
        }
        history.append(row)
        score = sign * row[cfg.monitor]
        improved = best_score is None or score < best_score - 1e-6
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in shipped.state_dict().items()}
        else:
            bad_epochs += 1
        row["best_epoch"] = best_epoch
        if verbose:
            log(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
                f"val loss {val_loss:.4f} acc {row['val_accuracy']:.4f} macro-F1 {row['val_macro_f1']:.4f}  "
                f"lr {row['lr']:.2e}  {row['epoch_time_s']:.1f}s{'  *' if improved else ''}")

        def checkpoint(epoch: int = epoch) -> dict[str, Any]:
            """A snapshot (deep copy): later epochs do not change what was returned."""
            return copy.deepcopy({"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history, "epoch": epoch, "best_score": best_score,
                    "best_epoch": best_epoch, "bad_epochs": bad_epochs, "best_state": best_state,
                    "config": dump_config(cfg)})

        if on_epoch is not None:
            on_epoch(dict(row), checkpoint)
        if cfg.early_stopping_patience and bad_epochs >= cfg.early_stopping_patience:
            stopped_early = True
            if verbose:
                log(f"early stopping: {cfg.monitor} has not improved for {bad_epochs} epochs (best epoch {best_epoch})")
            break
    if best_state is not None:
        shipped.load_state_dict(best_state)
    best = next((h for h in history if h["epoch"] == best_epoch), {})
    return FitResult(model=shipped.eval(), history=history, best_epoch=best_epoch, best=best, stopped_early=stopped_early)


def evaluate_and_package(cfg: TrainConfig, data: PreparedData, result: FitResult, out_dir: str,
                         name: str = "leukray-mobilenetv2", extra_card: dict[str, Any] | None = None) -> dict[str, Any]:
    """Calibrate on val, fit the out-of-distribution guard (reference: train; threshold: val), measure on the
    untouched test split, write plots, metrics and a model package."""
    from .calibration import FIT_DESCRIPTION, fit_mode
    from .metrics import classification_metrics
    from .plots import plot_confusion_matrix, plot_curves

    val_idx, test_idx = data.indices("val"), data.indices("test")
    model = packaging_model(result.model, cfg)
    k = len(CLASSES)

    val, fitted = fit_mode(model, np.asarray(data.images[val_idx]), data.labels[val_idx], cfg.tta, k)
    temperature = float(fitted["temperature"])
    val_logits, val_features = split_outputs(val.values, k)
    val_metrics = classification_metrics(data.labels[val_idx], val.probs(k), CLASSES)
    ids = view_ids(cfg.tta)

    def features_of(images: np.ndarray) -> np.ndarray:
        return split_outputs(model.mean_views(images, ids), k)[1]

    train_images = np.asarray(data.images[data.indices("train")])  # one copy for the guard's three references
    reference, made = guard_reference(features_of, train_images, cfg.ood, cfg.augment, cfg.augment_strength,
                                      cfg.augment_zoom, cfg.seed, cfg.augment_codecs)
    colour_ref, colour_val = colour_envelopes(train_images, np.asarray(data.images[val_idx]), cfg.ood, cfg.seed)
    optics = optics_reference(features_of, train_images, cfg.ood, cfg.seed)
    guard = fit_guard(reference, val_logits, val_features, temperature, cfg.ood,
                      fitted={"split": "val", "n_val": int(len(val_idx)), "reference_split": "train",
                              "reference_made": made, "tta": cfg.tta},
                      colour_reference=colour_ref, colour_val=colour_val, optics_features=optics)
    test_metrics = None
    if len(test_idx):
        card_views = {"tta": cfg.tta, "temperature": temperature, **fitted}
        test = Predictor(model, ViewPolicy.from_card(card_views), k)(np.asarray(data.images[test_idx]))
        test_logits, test_features = split_outputs(test.values, k)
        test_metrics = classification_metrics(data.labels[test_idx], test.probs(k), CLASSES)
        test_metrics["ood_flagged_fraction"] = float((~guard.in_distribution(guard.scores(test_logits, test_features))).mean())
        test_metrics["mean_views"] = float(test.views.mean())
    card = {
        "name": name, "version": "unversioned", "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "classes": list(CLASSES),
        "architecture": cfg.model.model_dump(include={"arch", "dropout", "head_width", "colour_norm"}),
        "preprocessing": {"image_size": cfg.image_size, "input": "RGB uint8 resized (bilinear) to image_size, "
                          "fed as float32 NCHW in [0,255]; the network applies its colour normalisation "
                          f"({cfg.model.colour_norm}), rescales to [0,1] and ImageNet-normalises",
                          "decoder": "leukray.images.decode_image"},
        "temperature": temperature,
        "tta": cfg.tta,
        **({"adaptive": dict(fitted["adaptive"], split="val")} if "adaptive" in fitted else {}),
        "calibration": {"split": "val", "tta": cfg.tta, "n": int(len(val_idx)),
                        "errors": int((val_logits.argmax(1) != data.labels[val_idx]).sum()),
                        "fit": FIT_DESCRIPTION},
        "ood": guard.card(),
        "metrics": {"val": val_metrics, "test": test_metrics},
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "class_counts": data.class_counts("train"),
        "split": summarize(data.manifest), "split_manifest_hash": data.manifest_hash,
        "split_manifest": data.manifest_uri, "data": data.root, "unreadable": data.unreadable,
        "config": dump_config(cfg),
        "library_versions": library_versions(),
    }
    card.update(extra_card or {})
    with tempfile.TemporaryDirectory() as tmp:
        write_package(tmp, result.model, card)
        save_reference(guard, tmp)
        storage.write_json(os.path.join(tmp, "metrics.json"), {"val": val_metrics, "test": test_metrics,
                                                                "temperature": temperature, "best_epoch": result.best_epoch})
        storage.write_json(os.path.join(tmp, "history.json"), result.history)
        with open(os.path.join(tmp, "config.yaml"), "w") as fh:
            yaml.safe_dump(dump_config(cfg), fh, sort_keys=False)
        plot_curves(result.history, os.path.join(tmp, "curves.png"))
        if test_metrics is not None:
            plot_confusion_matrix(test_metrics["confusion_matrix"], CLASSES, os.path.join(tmp, "confusion_matrix.png"),
                                  title="test split")
        save_manifest(data.manifest, os.path.join(tmp, "split.parquet"))
        storage.upload_dir(tmp, out_dir, cfg.storage)
    return card


def train(cfg: TrainConfig, out_dir: str) -> dict[str, Any]:
    """`leukray train`: the whole standalone run; returns the model card."""
    t0 = time.time()
    data = prepare_data(cfg, manifest_uri=storage.join(out_dir, "split.parquet"))
    result = fit(cfg, data)
    card = evaluate_and_package(cfg, data, result, out_dir)
    t = card["metrics"]["test"]
    if t:
        log(f"test split: accuracy {t['accuracy']:.4f}  macro-F1 {t['macro']['f1']:.4f}  "
            f"(n={t['n']}, best epoch {result.best_epoch}, {time.time() - t0:.0f}s)")
    log(f"model package: {out_dir}")
    return card

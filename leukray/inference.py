"""Model inference, one home for training's validation, `leukray evaluate` / `calibrate` and scoring.

Three layers, read top to bottom:

1. A backend runs the plain network on uint8 NHWC images and returns one float32 array (N, K + D): logits, then
   the pooled features the out-of-distribution guard reads (`leukray.ood.split_outputs`). `OpenVINOModel` (the
   package's ONNX graph compiled for this CPU), `OnnxModel` (ONNX Runtime fp32, the reference on CPU),
   `TorchModel` (the weights; bf16 autocast + channels_last on CUDA). Each has `mean_views(images, ids)`: the mean
   outputs over the test-time views `ids` (`leukray.tta.view`); the torch one uploads each batch once and makes the
   views on the device.
2. `Predictor`: the package's test-time mode (`ViewPolicy`, from the card) over a backend → `Outputs`: the mean
   outputs, how many views each row used, and the temperature that row's path was calibrated with. `adaptive`
   scores every image once and only the images whose calibrated one-view confidence is below the card's cascade
   threshold in the remaining views.
3. `BF16Guard`: OpenVINO bf16 outputs, with the images whose bf16 margin could hide a change of class re-scored in
   f32.

`softmax` is the one place logits become calibrated probabilities.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from . import CLASSES
from .tta import ADAPTIVE, ADAPTIVE_FULL, TTA_VIEWS, package_tta, resolve_tta, torch_view, view, view_ids

ONNX = "model.onnx"


def softmax(logits: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """Calibrated probabilities softmax(logits / T) in float64; T a scalar or one per row."""
    t = np.asarray(temperature, dtype=np.float64)
    if not (t > 0).all():
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / (t[:, None] if t.ndim == 1 else t)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def default_threads(num_actors: int = 1) -> int:
    """This node's CPUs shared between `num_actors` actors."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, num_actors))


# ------------------------------------------------------------------------------------------------ backends
class Backend(Protocol):
    def __call__(self, images_nhwc: np.ndarray) -> np.ndarray: ...
    def mean_views(self, images_nhwc: np.ndarray, ids: list[int]) -> np.ndarray: ...


def mean_over_views(run: Callable[[np.ndarray], np.ndarray], images_nhwc: np.ndarray, ids: list[int]) -> np.ndarray:
    """Mean of `run` over the views `ids` (float64 sum, float32 result); one view: `run` itself."""
    if ids == [0]:
        return run(images_nhwc)
    n = len(images_nhwc)
    if n * len(ids) <= 512:  # a small batch (adaptive's unsure images): all views in one call fill the streams
        out = np.asarray(run(np.concatenate([view(images_nhwc, i) for i in ids])), dtype=np.float64)
        return out.reshape(len(ids), n, -1).mean(axis=0).astype(np.float32)
    total = None
    for i in ids:
        out = np.asarray(run(np.ascontiguousarray(view(images_nhwc, i))), dtype=np.float64)
        total = out if total is None else total + out
    return (total / len(ids)).astype(np.float32)


def tta_logits(predict: Callable[[np.ndarray], np.ndarray], images_nhwc: np.ndarray, mode: str) -> np.ndarray:
    """Mean outputs of `predict` over a fixed mode's views."""
    if mode not in TTA_VIEWS:
        raise ValueError(f"tta={mode!r} is not a fixed test-time augmentation mode; allowed: {', '.join(TTA_VIEWS)}")
    return mean_over_views(predict, images_nhwc, view_ids(mode))


def with_tta(predict: Callable[[np.ndarray], np.ndarray], mode: str) -> Callable[[np.ndarray], np.ndarray]:
    if mode not in TTA_VIEWS:
        raise ValueError(f"tta={mode!r} is not a fixed test-time augmentation mode; allowed: {', '.join(TTA_VIEWS)}")
    if mode == "none":
        return predict
    return lambda images: tta_logits(predict, images, mode)


class _NumpyViews:
    def mean_views(self, images_nhwc: np.ndarray, ids: list[int]) -> np.ndarray:
        return mean_over_views(self, images_nhwc, ids)


def resolve_cpu_precision(precision: str) -> str:
    """auto → bf16 where this CPU computes bf16 natively (AMX / AVX512-BF16, as OpenVINO reports it), else f32."""
    if precision != "auto":
        return precision
    import openvino as ov

    return "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"


class OpenVINOModel(_NumpyViews):
    """The package's ONNX graph compiled by OpenVINO for this CPU, run as one single-threaded stream per thread.

    Input is uint8 NHWC (the cast and transpose run inside the graph). A batch is cut into requests of
    `request_images` images that the streams take in turn: on MobileNetV2 at 224 px, 2-image requests on one
    thread each run ~1.4x faster than one 64-image request on all threads (activations stay in cache, no
    intra-op synchronisation on the small depthwise layers; docs/scoring.md). Results are the same numbers: each
    image's logits do not depend on which request carried it."""

    def __init__(self, onnx_bytes: bytes, threads: int, precision: str, request_images: int = 2):
        import tempfile

        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        core = ov.Core()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, ONNX)
            with open(path, "wb") as f:
                f.write(onnx_bytes)
            model = core.read_model(path)
        ppp = PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32)
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        threads = max(1, threads)
        self.compiled = core.compile_model(ppp.build(), "CPU", {
            "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": threads, "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision})
        self.request_images = max(1, request_images)
        self.widths = [o.get_partial_shape()[1].get_length() for o in self.compiled.outputs]
        self.num_classes = self.widths[0]
        self.queue = ov.AsyncInferQueue(self.compiled, threads)
        self._out: np.ndarray | None = None
        self.queue.set_callback(self._done)

    def _done(self, request, start: int) -> None:
        at = 0
        for i, width in enumerate(self.widths):
            part = request.get_output_tensor(i).data
            self._out[start:start + len(part), at:at + width] = part
            at += width

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 → (N, K + D) float32 outputs; one call at a time (the caller's model lock)."""
        self._out = out = np.empty((len(x), sum(self.widths)), np.float32)
        x = np.asarray(x, dtype=np.uint8)
        for start in range(0, len(x), self.request_images):
            self.queue.start_async({0: np.ascontiguousarray(x[start:start + self.request_images])}, start)
        self.queue.wait_all()
        self._out = None
        return out


class OnnxModel(_NumpyViews):
    """ONNX Runtime fp32 on the CPU: the reference backend (probabilities within 1e-4 of the PyTorch model)."""

    def __init__(self, onnx_bytes: bytes, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = max(1, threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave idle cores to decoding
        self.session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.widths = [o.shape[1] for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x).transpose(0, 3, 1, 2).astype(np.float32)  # model contract: float32 NCHW in [0, 255]
        return np.concatenate(self.session.run(None, {self.input_name: x}), axis=1)


def predict_outputs(model: Any, images: np.ndarray, device: Any, batch_size: int = 128,
                    channels_last: bool = True, amp: bool = True) -> np.ndarray:
    """(N, K + D) float32: the torch model's logits, then its pooled features, one pass per batch (bf16 autocast on
    CUDA when `amp`)."""
    return TorchModel(model, device, batch_size, channels_last, amp)(images)


class TorchModel:
    """The package's weights in PyTorch: on CUDA bf16 autocast and channels_last; one upload per batch, the
    test-time views made on the device."""

    def __init__(self, model: Any, device: Any, batch_size: int = 128, channels_last: bool | None = None,
                 amp: bool = True):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_size, self.amp = max(1, batch_size), amp and self.device.type == "cuda"

    def __call__(self, images_nhwc: np.ndarray) -> np.ndarray:
        return self.mean_views(images_nhwc, [0])

    def mean_views(self, images_nhwc: np.ndarray, ids: list[int]) -> np.ndarray:
        torch = self.torch
        parts = []
        with torch.inference_mode():
            for start in range(0, len(images_nhwc), self.batch_size):
                x = torch.as_tensor(np.ascontiguousarray(images_nhwc[start:start + self.batch_size]))
                x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
                total = None
                for i in ids:
                    v = torch_view(x, i)
                    v = v.contiguous(memory_format=torch.channels_last) if self.channels_last else v.contiguous()
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                        out = torch.cat(self.model.forward_with_features(v), 1).float()
                    total = out if total is None else total + out
                parts.append((total / len(ids)).cpu())
        if not parts:
            return np.zeros((0, len(CLASSES)), np.float32)
        return torch.cat(parts).numpy()


BACKENDS = ("torch", "onnx", "openvino")


def load_backend(backend: str, device: str = "cpu", threads: int = 0, precision: str = "f32",
                 request_images: int = 2, onnx_bytes: bytes | None = None, model: Any = None,
                 batch_size: int = 128) -> Backend:
    """A backend by name: openvino / onnx need the package's ONNX bytes, torch the loaded weights."""
    threads = threads or default_threads()
    if backend == "openvino":
        return OpenVINOModel(onnx_bytes, threads, resolve_cpu_precision(precision), request_images)
    if backend == "onnx":
        return OnnxModel(onnx_bytes, threads)
    if backend == "torch":
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        return TorchModel(model, device, batch_size)
    raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")


# ------------------------------------------------------------------------------------------------ views
@dataclass
class ViewPolicy:
    """How a package's images are scored: the test-time mode, and the temperature of each path."""
    mode: str
    temperature: float
    """The temperature of the mode's (full) path."""
    temperature_one_view: float | None = None
    """adaptive: the temperature of the one-view path."""
    threshold: float = 0.0
    """adaptive: images whose calibrated one-view confidence is below this are scored in every view."""
    calibrated: bool = True
    """False when the card's temperature was fitted for another mode (confidences may be off)."""

    @classmethod
    def from_card(cls, card: dict[str, Any], requested: str = "package") -> ViewPolicy:
        """`requested` (package | a mode) with the temperatures the card has for it: an adaptive package carries
        the one-view and the full temperature, so `none` and `dihedral8` are calibrated too."""
        mode = resolve_tta(requested, card)
        temperature = float(card.get("temperature") or 1.0)
        ad = card.get("adaptive")
        if mode == ADAPTIVE:
            if not ad:
                raise ValueError(f"tta=adaptive needs a package calibrated for it (card 'adaptive': the cascade "
                                 f"threshold); model {card.get('name')} {card.get('version')} has tta="
                                 f"{package_tta(card)} (fit one: leukray calibrate --tta adaptive)")
            return cls(mode, float(ad["temperature_full"]), float(ad["temperature_one_view"]), float(ad["threshold"]))
        if ad and mode == "none":
            return cls(mode, float(ad["temperature_one_view"]))
        if ad and mode == ad.get("full", ADAPTIVE_FULL):
            return cls(mode, float(ad["temperature_full"]))
        return cls(mode, temperature, calibrated=mode == package_tta(card))


@dataclass
class Outputs:
    """What a predictor returns for N images."""
    values: np.ndarray
    """(N, K + D) float32: mean logits, then mean pooled features, over the views the row used."""
    views: np.ndarray
    """(N,) int: forward passes (views) the row used."""
    temperature: np.ndarray
    """(N,) float: the temperature of the row's path."""

    def probs(self, num_classes: int) -> np.ndarray:
        return softmax(self.values[:, :num_classes], self.temperature)

    def take(self, idx: np.ndarray) -> Outputs:
        return Outputs(self.values[idx], self.views[idx], self.temperature[idx])

    def put(self, idx: np.ndarray, other: Outputs) -> None:
        self.values[idx], self.views[idx], self.temperature[idx] = other.values, other.views, other.temperature

    @staticmethod
    def concat(parts: list[Outputs]) -> Outputs:
        return Outputs(np.concatenate([p.values for p in parts]), np.concatenate([p.views for p in parts]),
                       np.concatenate([p.temperature for p in parts]))


class Predictor:
    """uint8 NHWC images → `Outputs` under a `ViewPolicy`."""

    def __init__(self, model: Backend, policy: ViewPolicy, num_classes: int):
        self.model, self.policy, self.k = model, policy, num_classes

    def __call__(self, images_nhwc: np.ndarray) -> Outputs:
        p, n = self.policy, len(images_nhwc)
        if p.mode != ADAPTIVE:
            ids = view_ids(p.mode)
            out = np.asarray(self.model.mean_views(images_nhwc, ids), dtype=np.float32)
            return Outputs(out, np.full(n, len(ids), np.int64), np.full(n, p.temperature))
        full = view_ids(ADAPTIVE_FULL)
        out = np.array(self.model.mean_views(images_nhwc, [0]), dtype=np.float32)
        unsure = softmax(out[:, :self.k], p.temperature_one_view).max(axis=1) < p.threshold if n else np.zeros(0, bool)
        if unsure.any():
            rest = np.asarray(self.model.mean_views(images_nhwc[unsure], full[1:]), dtype=np.float64)
            out[unsure] = ((out[unsure] + rest * (len(full) - 1)) / len(full)).astype(np.float32)
        return Outputs(out, np.where(unsure, len(full), 1).astype(np.int64),
                       np.where(unsure, p.temperature, p.temperature_one_view))


BF16_PROB_TOL = 0.01
"""Stated tolerance of the guarded bf16 path against the PyTorch fp32 model's calibrated probabilities, with the
same class for every image (tested; f32 backends: 1e-4)."""
BF16_ERROR_SAFETY = 2.0
"""The guard assumes bf16's logit error is at most this times the largest error it has measured on the run."""


class BF16Guard:
    """bf16 outputs → outputs within BF16_PROB_TOL of f32's after calibration, with f32's class.

    If every logit is within E of f32's, f32's top-two margin is at least bf16's margin M minus 2E; when that is at
    least T ln((K-1)/tol) (T the row's temperature, K classes), both top probabilities are >= 1 - tol, so no
    probability moves by more than tol and the class cannot change. Images below that margin are scored again in
    f32. E is BF16_ERROR_SAFETY x the largest error measured: on the whole first batch (scored both ways), then on
    every re-scored image. When the first batch needs f32 for most images anyway, it goes f32 for good."""

    def __init__(self, bf16: Callable[[np.ndarray], Outputs], f32: Callable[[np.ndarray], Outputs], num_classes: int):
        self.bf16, self.f32, self.k = bf16, f32, num_classes
        self.error: float | None = None  # largest |bf16 - f32| logit difference seen
        self.images = self.rechecked = 0  # how much bf16 had to hand to f32

    @property
    def kept(self) -> bool:
        return self.bf16 is not None

    def _error(self, a: Outputs, b: Outputs) -> float:
        same = a.views == b.views  # adaptive: compare rows that took the same path
        return float(np.abs(a.values[same, :self.k] - b.values[same, :self.k]).max()) if same.any() else 0.0

    def __call__(self, images_nhwc: np.ndarray) -> Outputs:
        if self.bf16 is None:
            return self.f32(images_nhwc)
        got = self.bf16(images_nhwc)
        first = self.error is None
        if first:
            ref = self.f32(images_nhwc)
            self.error = self._error(ref, got) if len(images_nhwc) else 0.0
        top2 = np.sort(got.values[:, :self.k], axis=1)[:, -2:]
        need = 2 * BF16_ERROR_SAFETY * self.error + got.temperature * math.log((self.k - 1) / BF16_PROB_TOL)
        unsure = (top2[:, 1] - top2[:, 0]) < need
        self.images += len(images_nhwc)
        self.rechecked += int(unsure.sum())
        if first:
            if unsure.mean() > 0.5:
                print(f"[leukray] bf16 is too coarse for this model (logit error {self.error:.3f}, {unsure.mean():.0%} "
                      "of the first batch would need f32): scoring in f32", file=sys.stderr, flush=True)
                self.bf16 = None
            return ref
        if unsure.any():
            redo = self.f32(images_nhwc[unsure])
            self.error = max(self.error, self._error(redo, got.take(unsure)))
            got.put(unsure, redo)
        return got


PACKAGE_BACKENDS = ("auto", "torch", "openvino")


def openvino_here(device: Any) -> bool:
    """`auto`'s choice: OpenVINO on a CPU where it is installed (several times faster than PyTorch there)."""
    import importlib.util

    return getattr(device, "type", str(device)) == "cpu" and importlib.util.find_spec("openvino") is not None


def package_backend(pkg: Any, device: Any, batch_size: int, backend: str = "auto", storage_options: Any = None,
                    onnx_bytes: bytes | None = None) -> tuple[Backend, str]:
    """A loaded package's backend for evaluate and calibrate, and its name. On a CPU `auto` runs the package's ONNX
    graph with OpenVINO in fp32 as scoring does (several times faster than PyTorch there, same numbers to ~1e-6:
    the robustness suite's 10 000+ forward passes take minutes instead of a quarter of an hour); elsewhere
    PyTorch."""
    if backend not in PACKAGE_BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(PACKAGE_BACKENDS)}")
    dev_type = getattr(device, "type", str(device))
    if backend == "auto":
        backend = "openvino" if openvino_here(device) else "torch"
    if backend == "openvino":
        if dev_type != "cpu":
            raise ValueError(f"backend=openvino runs on the CPU; device={device} needs backend torch (or auto)")
        from .registry import read_onnx

        return OpenVINOModel(onnx_bytes or read_onnx(pkg, storage_options), default_threads(), "f32"), "openvino f32"
    return TorchModel(pkg.model, device, batch_size), f"torch {device}"

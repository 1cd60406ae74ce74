"""Batch scoring on Ray Data: an image archive (local folder or s3://prefix) → the results Delta table, nightly
and incremental.

The only module with Ray Data calls. One run:

1. `list_inputs`     list image files on the driver (path, size, source_version = S3 ETag / local mtime in ns).
2. `results.scored_keys` + `select_new`   anti-join against the committed rows of the same model name + version
                     (only `path, source_version` are read) → only new or changed files.
3. `build_dataset`   Ray Data pipeline, two stages: file table → `_Scorer` actors (model loaded once per actor:
                     OpenVINO on CPU, torch bf16 + channels_last on CUDA), each reading + decoding its batch in
                     a thread pool while the model runs the previous batch (one error row per bad file) → Arrow
                     rows with the documented schema → `results.write_files` tasks: the workers write the rows as
                     Parquet data files of the table and return only each file's metadata.
4. `results.Committer`   the driver commits the files it has been told about to the Delta log every
                     commit_every_files files or commit_every_minutes minutes, and once more at the end: each commit
                     atomic and carrying the run's record. No result row passes through the driver.
5. `results.vacuum`  removes files no commit references (runs that died before committing) once older than
                     vacuum_retention_hours.

Layout and schema: docs/architecture.md ("Scoring output"), leukray/results.py; semantics and numbers: docs/scoring.md.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import CLASSES, results, storage
from .config import ConfigError, StorageOptions, StrictModel, dump_config
from .images import ImageDecodeError, decode_image, is_image_name
from .ood import load_guard, review_reason, split_outputs
from .results import FILE_SCHEMA, prob_column
from .tta import TTA_VIEWS, check_tta, package_tta, resolve_tta, torch_views, tta_logits

CARD, ONNX, LATEST = "model_card.json", "model.onnx", "LATEST"
"""Package file names (as in leukray.registry, which imports torch: workers that only decode or run ONNX Runtime
never import it, which keeps each Ray worker at a fraction of the memory)."""

LISTING_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("source_version", pa.string())])


class ScoreConfig(StrictModel):
    """configs/score.yaml. Unknown keys are rejected by name."""

    input: str | None = None
    """Archive prefix: local folder or s3://bucket/prefix; searched recursively for jpg/jpeg/png/tif/tiff/bmp
    (any case)."""
    output: str | None = None
    """The results Delta table (local folder or s3://bucket/prefix), created by the first run."""
    model: str | None = None
    """Registry reference: a package folder (model_card.json) or a model folder (LATEST → that version)."""
    storage: StorageOptions = StorageOptions()
    """Object storage (endpoint_url for S3-compatible stores; key/secret are masked in every dump)."""
    batch_size: int = 64
    """Images per model call (per actor)."""
    decode_batch_size: int = 16
    """Files per read+decode chunk in the actor's decode thread pool (one s3fs request per chunk on S3)."""
    files_per_block: int = 64
    """Rows of the file table per input block."""
    num_actors: int = 1
    """Model actors (the Ray Data `concurrency` of the scoring stage)."""
    num_cpus_per_actor: float = 1.0
    """CPUs reserved per model actor (the inference backend may use more threads, see intra_op_threads)."""
    num_gpus_per_actor: float = 1.0
    """GPUs per model actor, used only when the cluster has GPUs (and device is auto or cuda)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda actors when the cluster has GPUs, else CPU actors."""
    backend: Literal["auto", "onnx", "openvino", "torch"] = "auto"
    """auto: torch (bf16 autocast, channels_last) on CUDA, OpenVINO on CPU. onnx: ONNX Runtime fp32 on CPU (the
    reference: probabilities within 1e-4 of the PyTorch model)."""
    cpu_precision: Literal["auto", "f32", "bf16"] = "f32"
    """OpenVINO inference precision. f32 matches PyTorch within 1e-4. bf16 (AMX / AVX512-BF16 CPUs; auto = bf16
    where the CPU has it) is ~2x faster, but its logits differ from fp32 by up to ~0.5-2.4 on trained models,
    which moves uncertain images' probabilities by up to 0.3 and flips some classes, so it is guarded
    (`_Scorer._guard_bf16`): images whose bf16 margin could hide such a change are scored again in f32, and the
    run goes f32 when most would be — as it did for every trained Taleqani model (docs/scoring.md). ONNX Runtime
    runs f32 only."""
    intra_op_threads: int = 0
    """Inference threads per CPU actor; 0 = the CPUs of the node divided by num_actors. OpenVINO runs one
    single-threaded stream per thread."""
    cpu_request_images: int = 2
    """Images per OpenVINO inference request: a batch is cut into requests that the streams run side by side;
    small requests keep MobileNetV2's activations in cache (2 was fastest on the 2-core machine, docs/scoring.md)."""
    decode_threads: int = 2
    """Read+decode threads per model actor (PIL releases the GIL); they decode the next batch while the model runs."""
    tta: Literal["package", "none", "flips4", "dihedral8"] = "package"
    """Test-time augmentation (`leukray.tta`): package = the mode the model's temperature was fitted with (card
    `tta`; the default recipe ships dihedral8: 8 forward passes per image); none = one pass, 8x less model time,
    with the package's temperature (refit it with `leukray calibrate --tta none` for calibrated confidences)."""
    review_threshold: float = 0.8
    """needs_review = calibrated confidence < review_threshold (`leukray evaluate` reports what it catches)."""
    max_file_bytes: int = 256 * 1024 * 1024
    """Files larger than this are error rows without being read (decompression bombs are caught by pixel count)."""
    object_store_limit_mb: int = 256
    """Ray Data object store budget of the run (only file rows and output rows pass through it now that decoding
    happens inside the model actor); 0 = Ray's default (a share of the object store)."""
    max_rows_per_file: int = 10_000
    """Rows per data file a worker writes (the unit a commit can include: keep it well below what the actors score
    in commit_every_minutes)."""
    commit_every_files: int = 200_000
    """Commit the rows written so far after this many more input files (each commit atomic: a driver that dies
    loses at most the rows since the last commit, and the rerun scores only those)."""
    commit_every_minutes: float = 10.0
    """…or after this many minutes since the last commit, whichever comes first."""
    vacuum_after_run: bool = True
    """After the run, delete files no commit references that are older than vacuum_retention_hours."""
    vacuum_retention_hours: float = 168.0
    """Age a stray file must reach before a vacuum deletes it. Must exceed the time between a worker writing a file
    and its run committing it (commit_every_minutes plus a file's write time) for every run that may be writing
    the table: lower it only when no run is in flight."""
    delta_options: dict[str, str] = {}
    """Extra deltalake storage options for the table (e.g. `conditional_put: none` plus a DynamoDB commit lock,
    `AWS_S3_LOCKING_PROVIDER: dynamodb`, for an S3 store without conditional put). Credentials belong in storage."""
    run_date: str | None = None
    """Partition date YYYY-MM-DD; default: the UTC date the run started (set it for backfills)."""
    limit: int | None = None
    """Score at most this many new files (smoke tests); the rest wait for the next run."""
    ray_address: str | None = None
    """Ray cluster address; default: $RAY_ADDRESS (e.g. inside `ray job submit`), else a local Ray on 127.0.0.1."""

    def model_post_init(self, _: Any) -> None:
        if min(self.batch_size, self.decode_batch_size, self.files_per_block, self.num_actors, self.decode_threads,
               self.cpu_request_images) < 1:
            raise ValueError("batch_size, decode_batch_size, files_per_block, num_actors, decode_threads and "
                             "cpu_request_images must be >= 1")
        if not 0.0 <= self.review_threshold <= 1.0:
            raise ValueError(f"review_threshold={self.review_threshold} must be in [0, 1]")
        if self.backend in ("onnx", "torch") and self.cpu_precision == "bf16":
            raise ValueError(f"cpu_precision=bf16 needs backend openvino (or auto on CPU); backend={self.backend} "
                             "runs f32 on CPU")
        if self.max_rows_per_file < 1 or self.commit_every_files < 1 or self.commit_every_minutes <= 0:
            raise ValueError("max_rows_per_file and commit_every_files must be >= 1, commit_every_minutes > 0")
        if self.vacuum_retention_hours < 0:
            raise ValueError(f"vacuum_retention_hours={self.vacuum_retention_hours} must be >= 0")
        if self.run_date is not None:
            try:
                dt.date.fromisoformat(self.run_date)
            except ValueError:
                raise ValueError(f"run_date={self.run_date!r} must be a date YYYY-MM-DD") from None


class ScoreError(ValueError):
    """The run cannot start or cannot commit; the message says why and where."""


def log(msg: str) -> None:
    print(f"[leukray score] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ locations
def list_inputs(uri: str, opts: StorageOptions | None = None) -> pa.Table:
    """Image files under `uri` (recursive): path (full URI), size, source_version (ETag or mtime ns), sorted."""
    fs, root = storage.filesystem(uri, opts)
    remote = storage.is_remote(uri)
    rows: list[tuple[str, int, str]] = []
    if remote:
        storage.check_bucket(fs, root, uri)
        fs.invalidate_cache()
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            found = {}
        except PermissionError as err:
            raise storage.StorageError(f"access denied listing {uri}: {err}") from None
        for key, info in found.items():
            if info.get("type", "file") != "file" or not is_image_name(key):
                continue
            version = str(info.get("ETag") or info.get("VersionId") or info.get("LastModified") or "").strip('"')
            rows.append(("s3://" + key, int(info.get("size") or 0), version))
    else:
        if not os.path.exists(root):
            raise storage.StorageError(f"input not found: {uri} (expected a folder of images)")
        if os.path.isfile(root):
            walk = [(os.path.dirname(root), [], [os.path.basename(root)])]
        else:
            walk = os.walk(root)
        for dirpath, dirnames, filenames in walk:
            dirnames.sort()
            for name in filenames:
                if not is_image_name(name):
                    continue
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                rows.append((p, int(st.st_size), str(st.st_mtime_ns)))
    rows.sort()
    return pa.table({"path": [r[0] for r in rows], "size": [r[1] for r in rows],
                     "source_version": [r[2] for r in rows]}, schema=LISTING_SCHEMA)


def select_new(listing: pa.Table, scored: pa.Table) -> pa.Table:
    """Files of `listing` whose (path, source_version) is not among `scored` (new or changed files)."""
    if scored.num_rows == 0 or listing.num_rows == 0:
        return listing
    keys = scored.group_by(["path", "source_version"]).aggregate([])
    new = listing.join(keys, keys=["path", "source_version"], join_type="left anti")
    return new.sort_by("path").select(listing.column_names)


# ------------------------------------------------------------------------------------------------ pipeline stages
_FS_CACHE: dict[Any, Any] = {}


def _fs_for(remote: bool, opts: StorageOptions | None):
    key = (remote, opts.model_dump_json() if opts else None)
    if key not in _FS_CACHE:
        _FS_CACHE[key] = storage.filesystem("s3://x" if remote else "/", opts)[0]
    return _FS_CACHE[key]


def read_decode(paths: list[str], sizes: list[int], image_size: int, opts: StorageOptions | None,
                max_file_bytes: int) -> tuple[np.ndarray, list[str]]:
    """Files → `(images (N, S, S, 3) uint8, errors)` with errors[i] == "" when file i decoded. Never raises for a
    bad file: a read or decode failure becomes that file's error message (and later its error row)."""
    n, s = len(paths), image_size
    images = np.zeros((n, s, s, 3), dtype=np.uint8)
    errors = [""] * n
    fetch = []
    for i, p in enumerate(paths):
        if int(sizes[i]) > max_file_bytes:
            errors[i] = f"file too large: {int(sizes[i])} bytes exceeds max_file_bytes={max_file_bytes}"
        else:
            fetch.append(i)
    data: dict[str, Any] = {}
    remote_idx = [i for i in fetch if storage.is_remote(paths[i])]
    local_idx = [i for i in fetch if not storage.is_remote(paths[i])]
    if remote_idx:  # s3fs fetches a list of keys concurrently
        fs = _fs_for(True, opts)
        keys = [paths[i].split("://", 1)[1] for i in remote_idx]
        try:
            got = fs.cat(keys, on_error="return")
        except Exception as err:  # noqa: BLE001 - the whole request failed: every file gets the reason
            got = {k: err for k in keys}
        for i, k in zip(remote_idx, keys):
            data[paths[i]] = got.get(k, FileNotFoundError(k))
    for i in local_idx:
        try:
            with open(paths[i], "rb") as f:
                data[paths[i]] = f.read(max_file_bytes + 1)
        except OSError as err:
            data[paths[i]] = err
    for i in fetch:
        raw = data[paths[i]]
        if isinstance(raw, BaseException):
            if isinstance(raw, FileNotFoundError):
                errors[i] = "cannot read file: it vanished after listing (not found)"
            else:
                errors[i] = f"cannot read file: {type(raw).__name__}: {raw}"
            continue
        if len(raw) > max_file_bytes:
            errors[i] = f"file too large: more than max_file_bytes={max_file_bytes} bytes"
            continue
        try:
            images[i] = decode_image(raw, s)  # the one preprocessing path (same as training)
        except ImageDecodeError as err:
            errors[i] = str(err)
        except Exception as err:  # noqa: BLE001 - anything else a decoder throws is still one file's problem
            errors[i] = f"cannot decode image: {type(err).__name__}: {err}"
    return images, errors


def softmax_t(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities: softmax(logits / T) in float64."""
    z = logits.astype(np.float64) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def default_threads(num_actors: int = 1) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, num_actors))


BF16_PROB_TOL = 0.01
"""Stated tolerance of the guarded bf16 path against the PyTorch fp32 model's calibrated probabilities, with the
same class for every image (tested; f32 backends: 1e-4)."""
BF16_ERROR_SAFETY = 2.0
"""The guard assumes bf16's logit error is at most this times the largest error it has measured on the run."""


def resolve_cpu_precision(precision: str) -> str:
    """auto → bf16 where this CPU computes bf16 natively (AMX / AVX512-BF16, as OpenVINO reports it), else f32."""
    if precision != "auto":
        return precision
    import openvino as ov

    return "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"


class OpenVINOModel:
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
        """(N, S, S, 3) uint8 → (N, K + D) float32 outputs (logits, then the pooled features when the graph has
        them: `leukray.ood.split_outputs`); one call at a time (the actor's model lock)."""
        self._out = out = np.empty((len(x), sum(self.widths)), np.float32)
        for start in range(0, len(x), self.request_images):
            self.queue.start_async({0: np.ascontiguousarray(x[start:start + self.request_images])}, start)
        self.queue.wait_all()
        self._out = None
        return out


class _Scorer:
    """Model actor, the one stage of the pipeline: a batch of file rows (path, size, source_version) → read +
    decode in a small thread pool → the model → output rows (FILE_SCHEMA), one per file.

    Ray Data runs two calls of an actor at once (`max_concurrent_calls_per_actor=2`): while one call holds the
    model lock, the other reads and decodes the next batch (PIL and OpenVINO / ONNX Runtime release the GIL), so decoding
    hides behind the model without decoded images ever entering the object store."""

    def __init__(self, package_uri: str, opts: StorageOptions | None, device: str, backend: str, threads: int,
                 review_threshold: float, run_id: str, scored_at: dt.datetime, precision: str = "f32",
                 num_actors: int = 1, max_file_bytes: int = 256 * 1024 * 1024, decode_batch_size: int = 16,
                 decode_threads: int = 2, request_images: int = 2, tta: str = "none"):
        threads = threads or default_threads(num_actors)  # CPUs of the node the actor runs on
        self.tta = check_tta(tta)
        card = storage.read_json(storage.join(package_uri, CARD), opts)
        self.classes = list(card["classes"])
        self.temperature = float(card.get("temperature") or 1.0)
        self.model_name, self.model_version = card["name"], card["version"]
        self.image_size = int(card["preprocessing"]["image_size"])
        self.threshold = review_threshold
        self.run_id, self.scored_at = run_id, scored_at
        self.device, self.backend = device, backend
        self.opts, self.max_file_bytes, self.decode_batch_size = opts, max_file_bytes, decode_batch_size
        self.decode_pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")
        self.model_lock = threading.Lock()  # one model call at a time; decoding runs beside it
        unknown = [c for c in self.classes if c not in CLASSES]
        if unknown:
            raise ScoreError(f"model {package_uri} has classes {unknown} outside {list(CLASSES)}")
        if backend == "onnx":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave idle cores to decoding
            onnx_bytes = storage.read_bytes(storage.join(package_uri, ONNX), opts)
            self.session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
        elif backend == "openvino":
            onnx_bytes = storage.read_bytes(storage.join(package_uri, ONNX), opts)
            precision = resolve_cpu_precision(precision)
            self.compiled = OpenVINOModel(onnx_bytes, threads, precision, request_images)
            self.compiled_f32 = OpenVINOModel(onnx_bytes, threads, "f32", request_images) if precision == "bf16" else None
            self.bf16_error: float | None = None  # largest |bf16 - f32| logit difference seen in this actor
            self.images, self.rechecked = 0, 0  # how much of the run bf16 had to hand to f32
        else:
            import torch

            from . import registry

            pkg = registry.load_package(package_uri, opts)
            torch.set_num_threads(threads)
            self.torch = torch
            self.dev = torch.device("cuda" if device == "cuda" else "cpu")
            self.model = pkg.model.to(self.dev).to(memory_format=torch.channels_last).eval()
        # the out-of-distribution guard (None: a package from before it, or a graph without the features output)
        self.guard = load_guard(package_uri, card, opts)
        if backend in ("onnx", "openvino") and self.guard is not None:
            widths = (self.compiled.widths if backend == "openvino"
                      else [o.shape[1] for o in self.session.get_outputs()])
            if len(widths) < 2:
                self.guard = None

    def outputs(self, images_nhwc: np.ndarray) -> np.ndarray:
        """Calibration-ready logits and the pooled features (`leukray.ood.split_outputs`): the mean over the tta
        views (one view with tta none)."""
        if self.backend == "openvino":  # uint8 NHWC in: the conversion is part of the compiled graph
            x = np.ascontiguousarray(images_nhwc)
            logits = tta_logits(self.compiled, x, self.tta)
            if self.compiled_f32 is None:
                return logits
            return self._guard_bf16(x, logits)
        if self.backend == "onnx":
            return tta_logits(self._onnx, images_nhwc, self.tta)
        return self._torch(images_nhwc)

    def _onnx(self, images_nhwc: np.ndarray) -> np.ndarray:
        x = images_nhwc.transpose(0, 3, 1, 2).astype(np.float32)  # model contract: float32 NCHW in [0, 255]
        return np.concatenate(self.session.run(None, {self.input_name: x}), axis=1)

    def _torch(self, images_nhwc: np.ndarray) -> np.ndarray:
        """One upload per batch; the test-time views are made on the device."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).to(self.dev, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float()
            total = None
            for v in torch_views(x, self.tta):
                v = v.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.dev.type == "cuda"):
                    out = torch.cat(self.model.forward_with_features(v), 1).float()
                total = out if total is None else total + out
            return (total / TTA_VIEWS[self.tta]).cpu().numpy()

    def _guard_bf16(self, x: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """bf16 logits → logits within BF16_PROB_TOL of f32's after calibration, with f32's class.

        If every logit is within E of f32's, f32's top-two margin is at least bf16's margin M minus 2E; when that
        is at least T ln((K-1)/tol) (T the temperature, K classes), both top probabilities are >= 1 - tol, so no
        probability moves by more than tol and the class cannot change. Images below that margin are scored again
        in f32. E is BF16_ERROR_SAFETY x the largest error measured: on the whole first batch (scored both ways),
        then on every re-scored image. When the first batch needs f32 for most images anyway, the run goes f32."""
        k = len(self.classes)
        first = self.bf16_error is None
        if first:
            ref = tta_logits(self.compiled_f32, x, self.tta)
            self.bf16_error = float(np.abs(ref[:, :k] - logits[:, :k]).max()) if len(x) else 0.0
        top2 = np.sort(logits[:, :k], axis=1)[:, -2:]
        need = 2 * BF16_ERROR_SAFETY * self.bf16_error + self.temperature * math.log((k - 1) / BF16_PROB_TOL)
        unsure = (top2[:, 1] - top2[:, 0]) < need
        self.images += len(x)
        self.rechecked += int(unsure.sum())
        if first:
            if unsure.mean() > 0.5:
                print(f"[leukray score] bf16 is too coarse for this model (logit error {self.bf16_error:.3f}, "
                      f"{unsure.mean():.0%} of the first batch would need f32): scoring in f32",
                      file=sys.stderr, flush=True)
                self.compiled, self.compiled_f32 = self.compiled_f32, None
            return ref
        if unsure.any():
            redo = tta_logits(self.compiled_f32, x[unsure], self.tta)
            self.bf16_error = max(self.bf16_error, float(np.abs(redo[:, :k] - logits[unsure, :k]).max()))
            logits[unsure] = redo
        return logits

    def read_decode(self, paths: list[str], sizes: list[int]) -> tuple[np.ndarray, list[str]]:
        """`read_decode` over chunks of decode_batch_size files in the decode thread pool, in order."""
        step = self.decode_batch_size
        parts = list(self.decode_pool.map(
            lambda i: read_decode(paths[i:i + step], sizes[i:i + step], self.image_size, self.opts,
                                  self.max_file_bytes), range(0, len(paths), step)))
        if not parts:
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8), []
        return np.concatenate([p[0] for p in parts]), [e for p in parts for e in p[1]]

    def __call__(self, batch: pa.Table) -> pa.Table:
        images, errors = self.read_decode(batch["path"].to_pylist(), batch["size"].to_pylist())
        n = len(errors)
        ok = np.array([e == "" for e in errors], dtype=bool)
        k = len(self.classes)
        probs = np.full((n, k), np.nan)
        ood_score = np.full(n, np.nan)
        if ok.any():
            with self.model_lock:
                logits, features = split_outputs(self.outputs(images[ok]), k)
            probs[ok] = softmax_t(logits, self.temperature)
            if self.guard is not None:
                ood_score[ok] = self.guard.scores(logits, features)
        top = probs.argmax(axis=1) if n else np.zeros(0, dtype=int)
        conf = np.where(ok, probs.max(axis=1, initial=-1.0) if n else np.zeros(0), np.nan)
        mask = ~ok
        cols: dict[str, pa.Array] = {
            "path": batch["path"].combine_chunks(),
            "size": batch["size"].combine_chunks(),
            "source_version": batch["source_version"].combine_chunks(),
            "status": pa.array(np.where(ok, "ok", "error").tolist(), pa.string()),
            "error": pa.array([None if o else e for o, e in zip(ok, errors)], pa.string()),
            "predicted_class": pa.array([self.classes[t] if o else None for o, t in zip(ok, top)], pa.string()),
            "confidence": pa.array(conf, pa.float64(), mask=mask),
        }
        for c in CLASSES:
            if c in self.classes:
                cols[prob_column(c)] = pa.array(probs[:, self.classes.index(c)], pa.float64(), mask=mask)
            else:
                cols[prob_column(c)] = pa.nulls(n, pa.float64())
        low = conf < self.threshold
        guarded = ok & ~np.isnan(ood_score)
        ood = guarded & ~(ood_score <= (self.guard.threshold if self.guard is not None else np.inf))
        reasons = review_reason(low & ok, ood)
        cols["needs_review"] = pa.array(low | ood, pa.bool_(), mask=mask)
        cols["ood_score"] = pa.array(ood_score, pa.float64(), mask=~guarded)
        cols["in_distribution"] = pa.array(~ood, pa.bool_(), mask=~guarded)
        cols["review_reason"] = pa.array([r if o else None for r, o in zip(reasons, ok)], pa.string())
        cols["model_name"] = pa.array([self.model_name] * n, pa.string())
        cols["model_version"] = pa.array([self.model_version] * n, pa.string())
        cols["run_id"] = pa.array([self.run_id] * n, pa.string())
        cols["scored_at"] = pa.array([self.scored_at] * n, pa.timestamp("us", tz="UTC"))
        return pa.table(cols, schema=FILE_SCHEMA)


def init_ray(cfg: ScoreConfig) -> None:
    from .raycluster import connect

    connect(address=cfg.ray_address)


def plan_device(cfg: ScoreConfig) -> tuple[str, str, float]:
    """(device, backend, num_gpus per actor) for this cluster."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    device = cfg.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus <= 0:
        raise ScoreError("device=cuda but the Ray cluster has no GPUs")
    backend = cfg.backend
    if backend == "auto":
        backend = "torch" if device == "cuda" else "openvino"
    if device == "cuda" and backend in ("onnx", "openvino"):
        raise ScoreError(f"backend={backend} runs on CPU actors; use backend torch (or auto) with device=cuda")
    return device, backend, (cfg.num_gpus_per_actor if device == "cuda" else 0.0)


def _write_stage(rows: pa.Table, output: str, opts: StorageOptions | None, run_id: str, run_date: str) -> pa.Table:
    """The pipeline's last stage, on a worker: rows → one data file of the table → its metadata."""
    return results.write_files(rows, output, opts, run_id, run_date)


def build_dataset(files: pa.Table, cfg: ScoreConfig, package_uri: str, run_id: str, scored_at: dt.datetime,
                  device: str, backend: str, num_gpus: float, precision: str = "f32", tta: str = "none",
                  run_date: str | None = None):
    """The Ray Data pipeline: file table → `_Scorer` actors (read + decode + model) → rows (FILE_SCHEMA); with
    `run_date`, then → `_write_stage` tasks that write the rows as data files of the table at cfg.output and yield
    only the files' metadata (results.ACTION_SCHEMA)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    if cfg.object_store_limit_mb:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=cfg.object_store_limit_mb * 2**20)
    blocks = [files.slice(i, cfg.files_per_block) for i in range(0, files.num_rows, cfg.files_per_block)]
    threads = cfg.intra_op_threads  # 0: the actor picks its node's CPUs / num_actors (see _Scorer)
    pool = ray.data.ActorPoolStrategy(size=cfg.num_actors, max_concurrent_calls_per_actor=2,
                                      enable_true_multi_threading=True)  # decode batch k+1 while batch k runs
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(_Scorer, fn_constructor_args=(package_uri, cfg.storage, device, backend, threads,
                                                     cfg.review_threshold, run_id, scored_at, precision,
                                                     cfg.num_actors, cfg.max_file_bytes, cfg.decode_batch_size,
                                                     cfg.decode_threads, cfg.cpu_request_images, tta),
                        batch_size=cfg.batch_size, batch_format="pyarrow", compute=pool,
                        num_cpus=cfg.num_cpus_per_actor, num_gpus=num_gpus or None, zero_copy_batch=True)
    if run_date is None:
        return ds
    # Light I/O tasks: no CPU reserved, so they never wait behind model actors that hold every CPU of the cluster.
    return ds.map_batches(_write_stage, fn_kwargs={"output": cfg.output, "opts": cfg.storage, "run_id": run_id,
                                                   "run_date": run_date},
                          batch_size=cfg.max_rows_per_file, batch_format="pyarrow", zero_copy_batch=True, num_cpus=0,
                          concurrency=max(2, cfg.num_actors))


# ------------------------------------------------------------------------------------------------ the run
def _resolved(cfg: ScoreConfig) -> ScoreConfig:
    opts = cfg.storage
    if opts.endpoint_url is None and storage.endpoint_url(opts):
        # resolve $AWS_ENDPOINT_URL on the driver: Ray workers may not share the driver's environment
        opts = opts.model_copy(update={"endpoint_url": storage.endpoint_url(opts)})
        cfg = cfg.model_copy(update={"storage": opts})
    return cfg


def _location_error(err: results.ResultsError) -> ScoreError:
    return ScoreError(str(err))


def run(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every new or changed image under cfg.input with cfg.model into the results table; return the run's
    record (the one its last commit carries)."""
    for key in ("input", "output", "model"):
        if not getattr(cfg, key):
            raise ConfigError(f"score: '{key}' is required (set it in the config or pass --{key})")
    cfg = _resolved(cfg)
    opts = cfg.storage
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    run_date = cfg.run_date or started.date().isoformat()

    # everything that can be checked without Ray first: a missing bucket, an unconverted output or a missing model
    # fails here, clearly
    try:
        results.check_location(cfg.output, opts)
    except results.ResultsError as err:
        raise _location_error(err) from None
    from . import registry

    package_uri = registry.resolve(cfg.model, opts)
    card = storage.read_json(storage.join(package_uri, CARD), opts)
    model_name, model_version = card["name"], card["version"]
    tta = resolve_tta(cfg.tta, card)
    if tta != package_tta(card):
        log(f"tta={tta}, but {package_uri} was calibrated with tta={package_tta(card)}: confidences and needs_review "
            f"use its temperature as it is (refit: leukray calibrate --tta {tta})")
    if not card.get("ood"):
        log(f"warning: {package_uri} has no out-of-distribution guard: ood_score and in_distribution stay empty "
            f"and only low confidence sets needs_review (add one without retraining: leukray calibrate)")
    listing = list_inputs(cfg.input, opts)
    log(f"run {run_id}: model {model_name} {model_version} ({package_uri}); {listing.num_rows} image files under {cfg.input}")

    try:
        table = results.ensure_table(cfg.output, opts, cfg.delta_options)
        scored_before = results.scored_keys(cfg.output, opts, model_name, model_version)
    except results.ResultsError as err:
        raise _location_error(err) from None
    todo = select_new(listing, scored_before)
    skipped = listing.num_rows - todo.num_rows
    if cfg.limit is not None:
        todo = todo.slice(0, cfg.limit)
    log(f"{todo.num_rows} files to score, {skipped} already scored by {model_name} {model_version}")
    committer = results.Committer(cfg.output, opts, run_id, model_name, model_version, todo, cfg.delta_options,
                                  table=table)

    counts: dict[str, Any] = {"rows": 0, "scored": 0, "errors": 0, "first_rows_s": None, "files": 0}
    device = backend = precision_label = "none"
    record: dict[str, Any] = {
        "run_id": run_id, "run_date": run_date, "status": "running", "started_at": started.isoformat(),
        "model_name": model_name, "model_version": model_version, "model_uri": package_uri,
        "input": cfg.input, "output": cfg.output, "config": dump_config(cfg),
    }

    def snapshot(status: str, elapsed: float) -> dict[str, Any]:
        processed = counts["scored"] + counts["errors"]
        return dict(record, status=status, finished_at=dt.datetime.now(dt.timezone.utc).isoformat(),
                    files=counts["files"], rows=counts["rows"],
                    counts={"seen": listing.num_rows, "scored": counts["scored"], "skipped": skipped,
                            "errors": counts["errors"], "deferred": listing.num_rows - skipped - todo.num_rows},
                    throughput={"images_per_s": round(processed / elapsed, 2) if processed and elapsed > 0 else 0.0,
                                "pipeline_s": round(elapsed, 3), "wall_s": round(time.perf_counter() - t0, 3),
                                "first_rows_s": counts["first_rows_s"]},
                    driver={"result_rows": 0, "file_records": counts["files"]},
                    execution={"ood": ({k: card["ood"][k] for k in ("method", "k", "threshold")}
                                       if card.get("ood") else None),
                               "device": device, "backend": backend, "precision": precision_label,
                               "num_actors": cfg.num_actors, "tta": tta})

    t_pipe = time.perf_counter()
    if todo.num_rows:
        init_ray(cfg)
        device, backend, num_gpus = plan_device(cfg)
        precision = ("bf16" if device == "cuda" else
                     resolve_cpu_precision(cfg.cpu_precision) if backend == "openvino" else "f32")
        if precision == "bf16" and device == "cpu":
            precision_label = "bf16 guarded (unsure images in f32; f32 for the run if most are)"
        else:
            precision_label = precision
        t_pipe = time.perf_counter()
        log(f"scoring on {device} ({backend} {precision_label}), {cfg.num_actors} actor(s), batch {cfg.batch_size}, "
            f"tta {tta} ({TTA_VIEWS[tta]} view(s) per image); commits every {cfg.commit_every_files} files or "
            f"{cfg.commit_every_minutes:g} min")
        ds = build_dataset(todo, cfg, package_uri, run_id, started, device, backend, num_gpus, precision, tta,
                           run_date=run_date)
        pending: list[pa.Table] = []
        pending_rows, last_commit = 0, time.perf_counter()
        try:
            # only file metadata arrives here (results.ACTION_SCHEMA): the rows stay with the workers
            for files in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if files.num_rows == 0:
                    continue
                if counts["first_rows_s"] is None:
                    counts["first_rows_s"] = round(time.perf_counter() - t_pipe, 3)
                n = int(pc.sum(files["rows"]).as_py() or 0)
                ok = int(pc.sum(files["ok"]).as_py() or 0)
                counts["rows"] += n
                counts["scored"] += ok
                counts["errors"] += n - ok
                counts["files"] += files.num_rows
                pending.append(files)
                pending_rows += n
                if pending_rows >= cfg.commit_every_files or \
                        time.perf_counter() - last_commit >= cfg.commit_every_minutes * 60:
                    v = committer.commit(pa.concat_tables(pending), snapshot("running", time.perf_counter() - t_pipe))
                    log(f"committed {pending_rows} rows as version {v} ({counts['rows']} of {todo.num_rows} so far)")
                    pending, pending_rows, last_commit = [], 0, time.perf_counter()
        except results.ConcurrentRunError as err:
            raise ScoreError(str(err)) from None
        except Exception as err:
            if pending:  # complete data files: commit them, the rerun scores only what is left
                try:
                    committer.commit(pa.concat_tables(pending), snapshot("failed", time.perf_counter() - t_pipe))
                    log(f"run failed: committed the {pending_rows} rows written before the failure")
                except Exception as commit_err:  # noqa: BLE001
                    log(f"run failed, and its last {pending_rows} rows could not be committed: {commit_err}")
            raise ScoreError(f"run {run_id} failed after {counts['rows']} of {todo.num_rows} rows: "
                             f"{type(err).__name__}: {err}") from err
        if counts["rows"] != todo.num_rows:
            raise ScoreError(f"run {run_id}: {counts['rows']} rows for {todo.num_rows} input files; the last "
                             f"{pending_rows} rows were not committed")
        final_files = pa.concat_tables(pending) if pending else results.ACTION_SCHEMA.empty_table()
    else:
        final_files = results.ACTION_SCHEMA.empty_table()
    elapsed = time.perf_counter() - t_pipe
    try:
        out = snapshot("committed", elapsed)
        version = committer.commit(final_files, out)  # the run's last commit: its record is the run's record
    except results.ResultsError as err:
        raise ScoreError(str(err)) from None
    out.update(version=version, commits=committer.commits)
    if cfg.vacuum_after_run:
        try:
            removed = results.vacuum(cfg.output, opts, cfg.vacuum_retention_hours, cfg.delta_options)
            if removed:
                log(f"vacuum: removed {len(removed)} uncommitted file(s) older than {cfg.vacuum_retention_hours:g} h")
        except Exception as err:  # noqa: BLE001 - a vacuum is housekeeping: the run is committed
            log(f"vacuum failed (the run is committed; `leukray score --vacuum` retries it): {err}")
    return out


def vacuum(cfg: ScoreConfig) -> list[str]:
    """`leukray score --vacuum`: delete uncommitted files older than cfg.vacuum_retention_hours."""
    if not cfg.output:
        raise ConfigError("score --vacuum: 'output' is required (set it in the config or pass --output)")
    cfg = _resolved(cfg)
    try:
        return results.vacuum(cfg.output, cfg.storage, cfg.vacuum_retention_hours, cfg.delta_options)
    except results.ResultsError as err:
        raise ScoreError(str(err)) from None


def convert_legacy(output: str, cfg: ScoreConfig) -> dict[str, Any]:
    """`leukray score --convert-legacy OUTPUT`: the previous layout at OUTPUT → the results table."""
    cfg = _resolved(cfg)
    try:
        return results.convert_legacy(output, cfg.storage, cfg.delta_options, log=log)
    except results.ResultsError as err:
        raise ScoreError(str(err)) from None


def summary(record: dict[str, Any]) -> str:
    c, t = record["counts"], record["throughput"]
    return (f"run {record['run_id']} ({record['model_name']} {record['model_version']}): "
            f"files seen {c['seen']}, scored {c['scored']}, skipped as already scored {c['skipped']}, "
            f"errors {c['errors']}" + (f", deferred by limit {c['deferred']}" if c.get("deferred") else "")
            + f"; {t['images_per_s']} img/s ({t['pipeline_s']} s); {record['files']} data file(s) in "
            f"{record['commits']} commit(s), table {record['output']} at version {record['version']}")


# ------------------------------------------------------------------------------------------------ helpers for smoke/bench
def untrained_package(out_dir: str, image_size: int, name: str = "leukray-smoke", version: str = "v0001",
                      temperature: float = 1.0, seed: int = 0) -> str:
    """A random-weight MobileNetV2 package (smoke tests, throughput benchmarks): weights, ONNX, card."""
    import torch

    from . import registry
    from .model import ModelConfig, build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(weights="none", dropout=0.0), num_classes=len(CLASSES), verbose=False)
    card = {"name": name, "version": version, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "classes": list(CLASSES), "architecture": {"arch": "mobilenet_v2", "dropout": 0.0, "head_width": 128},
            "preprocessing": {"image_size": image_size, "input": "uint8 RGB NCHW, rescaled in-model",
                              "decoder": "leukray.images.decode_image"},
            "temperature": temperature, "metrics": {}, "class_counts": {}, "note": "untrained (random weights)",
            "library_versions": registry.library_versions()}
    registry.write_package(out_dir, model, card)
    return out_dir


def prepare_smoke(cfg: ScoreConfig) -> None:
    """For --smoke-test: create the configured local archive (synthetic smears + one bad file) and an untrained
    model package when they do not exist yet."""
    from .synth import make_dataset

    if cfg.model and not storage.is_remote(cfg.model) and not os.path.exists(os.path.join(cfg.model, CARD)) \
            and not os.path.exists(os.path.join(cfg.model, LATEST)):
        log(f"smoke test: writing an untrained model package to {cfg.model}")
        untrained_package(cfg.model, image_size=64)
    if cfg.input and not storage.is_remote(cfg.input) and not os.path.exists(cfg.input):
        log(f"smoke test: writing a synthetic archive to {cfg.input}")
        make_dataset(cfg.input, per_class=5, size=64, seed=0)
        with open(os.path.join(cfg.input, "not-an-image.jpg"), "w") as f:
            f.write("this is text, not a JPEG\n")


def main_summary_json(record: dict[str, Any]) -> str:
    keep = {k: record[k] for k in ("run_id", "run_date", "model_name", "model_version", "model_uri", "input",
                                   "output", "version", "commits", "files", "rows", "counts", "throughput", "driver",
                                   "execution")}
    return json.dumps(keep, indent=2)

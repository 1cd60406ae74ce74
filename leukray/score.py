"""Batch scoring on Ray Data: an image archive (local folder or s3://prefix) → the results Delta table, nightly
and incremental. Shaped like Ray's batch-inference example: list → a predictor class loaded once per actor →
map_batches → write. The only module with Ray Data calls. One run:

1. `archive.list_inputs`   list image files on the driver (path, size, source_version = S3 ETag / local mtime ns).
2. `results.scored_keys` + `archive.select_new`   anti-join against the committed rows of the same model name +
                     version (only `path, source_version` are read) → only new or changed files.
3. `build_dataset`   the Ray Data pipeline: file table → [`_decode_stage` CPU tasks] → `_Scorer` actors (the model
                     loaded once per actor: `leukray.inference`, OpenVINO on CPU, torch bf16 + channels_last on
                     CUDA; the package's test-time views, adaptive included) → rows with the documented schema →
                     `results.write_files` tasks: the workers write the rows as Parquet data files of the table and
                     return only each file's metadata. Decode layout (`decode`): on CPU-only clusters each actor
                     reads and decodes its own batches in a thread pool while the model runs the previous one (no
                     decoded image enters the object store); on GPU clusters read + decode run as CPU tasks spread
                     over the cluster's CPUs and the GPU actors only run the model. Bad files are error rows in both.
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
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import CLASSES, results, storage
from .archive import list_inputs, read_decode, select_new
from .config import ConfigError, StorageOptions, dump_config
from .images import IMAGE_TYPES
from .inference import (BF16Guard, Outputs, Predictor, ViewPolicy, default_threads, load_backend,
                        resolve_cpu_precision)
from .ood import check_names, guard_notes, load_guard, low_confidence, review_reason, split_outputs
from .results import FILE_SCHEMA, prob_column
from .score_config import ScoreConfig, ScoreError
from .tta import ADAPTIVE, TTA_VIEWS

CARD, ONNX = "model_card.json", "model.onnx"
"""Package file names (as in leukray.registry, which imports torch: workers that only decode or run ONNX Runtime
never import it, which keeps each Ray worker at a fraction of the memory)."""


def log(msg: str) -> None:
    print(f"[leukray score] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ pipeline stages
def _decode_stage(files: pa.Table, image_size: int, opts: StorageOptions | None, max_file_bytes: int) -> pa.Table:
    """CPU task of the tasks layout: file rows → the same rows with `error` ("" when decoded) and `image` (the
    decoded uint8 pixels, one fixed-size binary per file; zeros for a bad file)."""
    images, errors = read_decode(files["path"].to_pylist(), files["size"].to_pylist(), image_size, opts,
                                 max_file_bytes)
    width = image_size * image_size * 3
    pixels = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(errors), [None, pa.py_buffer(images)])
    return files.append_column("error", pa.array(errors, pa.string())).append_column("image", pixels)


def _images_of(batch: pa.Table, image_size: int) -> np.ndarray:
    col = batch["image"].combine_chunks()
    buf = np.frombuffer(col.buffers()[1], np.uint8)[col.offset * col.type.byte_width:]
    return buf[:len(col) * col.type.byte_width].reshape(len(col), image_size, image_size, 3)


class _Scorer:
    """Model actor: a batch of file rows (path, size, source_version; with the tasks layout also error + image) →
    [read + decode in a small thread pool] → the model → output rows (FILE_SCHEMA), one per file.

    Ray Data runs two calls of an actor at once (`max_concurrent_calls_per_actor=2`): while one call holds the
    model lock, the other reads and decodes the next batch (PIL and OpenVINO / ONNX Runtime release the GIL), so
    decoding hides behind the model without decoded images ever entering the object store."""

    def __init__(self, package_uri: str, opts: StorageOptions | None, device: str, backend: str, threads: int,
                 review_threshold: float, run_id: str, scored_at: dt.datetime, precision: str = "f32",
                 num_actors: int = 1, max_file_bytes: int = 256 * 1024 * 1024, decode_batch_size: int = 16,
                 decode_threads: int = 2, request_images: int = 2, tta: str = "none", model_batch_size: int = 128,
                 benign_malignant_threshold: float = 0.0):
        threads = threads or default_threads(num_actors)  # CPUs of the node the actor runs on
        card = storage.read_json(storage.join(package_uri, CARD), opts)
        self.classes = list(card["classes"])
        unknown = [c for c in self.classes if c not in CLASSES]
        if unknown:
            raise ScoreError(f"model {package_uri} has classes {unknown} outside {list(CLASSES)}")
        self.policy = ViewPolicy.from_card(card, tta)
        self.model_name, self.model_version = card["name"], card["version"]
        self.image_size = int(card["preprocessing"]["image_size"])
        self.threshold, self.benign_malignant_threshold = review_threshold, benign_malignant_threshold
        self.run_id, self.scored_at = run_id, scored_at
        self.opts, self.max_file_bytes, self.decode_batch_size = opts, max_file_bytes, decode_batch_size
        self.decode_pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")
        self.model_lock = threading.Lock()  # one model call at a time; decoding runs beside it
        k = len(self.classes)
        if backend == "torch":
            from . import registry

            model = load_backend("torch", "cuda" if device == "cuda" else "cpu", threads,
                                 model=registry.load_package(package_uri, opts).model, batch_size=model_batch_size)
            widths = [k, 1]
        else:
            onnx_bytes = storage.read_bytes(storage.join(package_uri, ONNX), opts)
            precision = resolve_cpu_precision(precision) if backend == "openvino" else "f32"
            model = load_backend(backend, "cpu", threads, precision, request_images, onnx_bytes)
            widths = model.widths
        self.predictor: Any = Predictor(model, self.policy, k)
        self.bf16: BF16Guard | None = None
        if precision == "bf16" and device == "cpu":
            f32 = Predictor(load_backend("openvino", "cpu", threads, "f32", request_images, onnx_bytes), self.policy, k)
            self.predictor = self.bf16 = BF16Guard(self.predictor, f32, k)
        # the out-of-distribution guard (None: a package from before it, or a graph without the features output)
        self.guard = load_guard(package_uri, card, opts) if len(widths) > 1 else None

    def outputs(self, images_nhwc: np.ndarray) -> Outputs:
        """The model's outputs under the package's test-time views (`leukray.inference.Outputs`)."""
        with self.model_lock:
            return self.predictor(np.ascontiguousarray(images_nhwc))

    def read_decode(self, paths: list[str], sizes: list[int]) -> tuple[np.ndarray, list[str]]:
        """`archive.read_decode` over chunks of decode_batch_size files in the decode thread pool, in order."""
        step = self.decode_batch_size
        parts = list(self.decode_pool.map(
            lambda i: read_decode(paths[i:i + step], sizes[i:i + step], self.image_size, self.opts,
                                  self.max_file_bytes), range(0, len(paths), step)))
        if not parts:
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8), []
        return np.concatenate([p[0] for p in parts]), [e for p in parts for e in p[1]]

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "image" in batch.column_names:  # tasks layout: decoded by _decode_stage
            images, errors = _images_of(batch, self.image_size), batch["error"].to_pylist()
        else:
            images, errors = self.read_decode(batch["path"].to_pylist(), batch["size"].to_pylist())
        ok = np.array([e == "" for e in errors], dtype=bool)
        out = self.outputs(images[ok]) if ok.any() else None
        return self.rows(batch, errors, ok, out)

    def rows(self, batch: pa.Table, errors: list[str], ok: np.ndarray, out: Outputs | None) -> pa.Table:
        """Output rows (FILE_SCHEMA): calibrated probabilities, review flags and the guard's verdict; error rows."""
        n, k = len(errors), len(self.classes)
        probs, ood_score, views = np.full((n, k), np.nan), np.full(n, np.nan), np.zeros(n, np.int32)
        ood_check: list[str | None] = [None] * n
        if out is not None:
            logits, features = split_outputs(out.values, k)
            probs[ok], views[ok] = out.probs(k), out.views
            if self.guard is not None:
                ood_score[ok], flagged_by = self.guard.flagged_by(logits, features)
                for i, c in zip(np.flatnonzero(ok), check_names(flagged_by)):
                    ood_check[i] = c
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
        low = ok & low_confidence(probs, self.classes, self.threshold, self.benign_malignant_threshold)
        guarded = ok & ~np.isnan(ood_score)
        ood = guarded & ~(ood_score <= (self.guard.threshold if self.guard is not None else np.inf))
        reasons = review_reason(low, ood)
        cols["needs_review"] = pa.array(low | ood, pa.bool_(), mask=mask)
        cols["ood_score"] = pa.array(ood_score, pa.float64(), mask=~guarded)
        cols["in_distribution"] = pa.array(~ood, pa.bool_(), mask=~guarded)
        cols["review_reason"] = pa.array([r if o else None for r, o in zip(reasons, ok)], pa.string())
        cols["ood_check"] = pa.array(ood_check, pa.string())
        cols["views"] = pa.array(views, pa.int32(), mask=mask)
        cols["model_name"] = pa.array([self.model_name] * n, pa.string())
        cols["model_version"] = pa.array([self.model_version] * n, pa.string())
        cols["run_id"] = pa.array([self.run_id] * n, pa.string())
        cols["scored_at"] = pa.array([self.scored_at] * n, pa.timestamp("us", tz="UTC"))
        return pa.table(cols, schema=FILE_SCHEMA)


def init_ray(cfg: ScoreConfig) -> None:
    from .raycluster import connect

    connect(address=cfg.ray_address)


def plan_device(cfg: ScoreConfig) -> tuple[str, str, float, str]:
    """(device, backend, num_gpus per actor, decode layout) for this cluster."""
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
    decode = cfg.decode if cfg.decode != "auto" else ("tasks" if device == "cuda" else "actor")
    return device, backend, (cfg.num_gpus_per_actor if device == "cuda" else 0.0), decode


def _write_stage(rows: pa.Table, output: str, opts: StorageOptions | None, run_id: str, run_date: str) -> pa.Table:
    """The pipeline's last stage, on a worker: rows → one data file of the table → its metadata."""
    return results.write_files(rows, output, opts, run_id, run_date)


def build_dataset(files: pa.Table, cfg: ScoreConfig, package_uri: str, run_id: str, scored_at: dt.datetime,
                  device: str, backend: str, num_gpus: float, precision: str = "f32", tta: str = "none",
                  run_date: str | None = None, decode: str = "actor", image_size: int = 224):
    """The Ray Data pipeline: file table → [`_decode_stage` CPU tasks, decode=tasks] → `_Scorer` actors (model;
    read + decode too with decode=actor) → rows (FILE_SCHEMA); with `run_date`, then → `_write_stage` tasks that
    write the rows as data files of the table at cfg.output and yield only the files' metadata
    (results.ACTION_SCHEMA)."""
    import ray

    batch_size = cfg.gpu_batch_size if device == "cuda" else cfg.batch_size
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    limit_mb = cfg.object_store_limit_mb
    if decode == "tasks" and limit_mb:  # decoded images pass the object store: room for 4 batches per actor
        limit_mb = max(limit_mb, 4 * cfg.num_actors * batch_size * image_size * image_size * 3 // 2**20)
    if limit_mb:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=limit_mb * 2**20)
    blocks = [files.slice(i, cfg.files_per_block) for i in range(0, files.num_rows, cfg.files_per_block)]
    ds = ray.data.from_arrow(blocks)
    if decode == "tasks":
        ds = ds.map_batches(_decode_stage, fn_kwargs={"image_size": image_size, "opts": cfg.storage,
                                                      "max_file_bytes": cfg.max_file_bytes},
                            batch_size=cfg.files_per_block, batch_format="pyarrow", num_cpus=1, zero_copy_batch=True)
    threads = cfg.intra_op_threads  # 0: the actor picks its node's CPUs / num_actors (see _Scorer)
    pool = ray.data.ActorPoolStrategy(size=cfg.num_actors, max_concurrent_calls_per_actor=2,
                                      enable_true_multi_threading=True)  # batch k+1 arrives while batch k runs
    ds = ds.map_batches(_Scorer, fn_constructor_args=(package_uri, cfg.storage, device, backend, threads,
                                                     cfg.review_threshold, run_id, scored_at, precision,
                                                     cfg.num_actors, cfg.max_file_bytes, cfg.decode_batch_size,
                                                     cfg.decode_threads, cfg.cpu_request_images, tta, batch_size,
                                                     cfg.benign_malignant_threshold),
                        batch_size=batch_size, batch_format="pyarrow", compute=pool,
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
    try:
        policy = ViewPolicy.from_card(card, cfg.tta)
    except ValueError as err:
        raise ScoreError(f"{package_uri}: {err}") from None
    tta = policy.mode
    if not policy.calibrated:
        log(f"tta={tta}, but {package_uri} was calibrated with tta={card.get('tta') or 'none'}: confidences and "
            f"needs_review use its temperature as it is (refit: leukray calibrate --tta {tta})")
    for line in guard_notes(card, package_uri):
        log(line)
    listing, not_images = list_inputs(cfg.input, opts)
    log(f"run {run_id}: model {model_name} {model_version} ({package_uri}); {listing.num_rows} image files under {cfg.input}")
    if not_images:
        log(f"not read: {sum(not_images.values())} file(s) without an image extension ("
            + ", ".join(f"{ext} {n}" for ext, n in not_images.items())
            + f"); images are read from {IMAGE_TYPES} files")

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
    device = backend = precision_label = decode = "none"
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
                            "errors": counts["errors"], "deferred": listing.num_rows - skipped - todo.num_rows,
                            "not_images": sum(not_images.values())},
                    throughput={"images_per_s": round(processed / elapsed, 2) if processed and elapsed > 0 else 0.0,
                                "pipeline_s": round(elapsed, 3), "wall_s": round(time.perf_counter() - t0, 3),
                                "first_rows_s": counts["first_rows_s"]},
                    driver={"result_rows": 0, "file_records": counts["files"]},
                    execution={"ood": ({k: card["ood"][k] for k in ("method", "k", "threshold")}
                                       if card.get("ood") else None),
                               "device": device, "backend": backend, "precision": precision_label,
                               "num_actors": cfg.num_actors, "tta": tta, "decode": decode,
                               "cascade_threshold": policy.threshold if tta == ADAPTIVE else None})

    t_pipe = time.perf_counter()
    if todo.num_rows:
        init_ray(cfg)
        device, backend, num_gpus, decode = plan_device(cfg)
        precision = ("bf16" if device == "cuda" else
                     resolve_cpu_precision(cfg.cpu_precision) if backend == "openvino" else "f32")
        if precision == "bf16" and device == "cpu":
            precision_label = "bf16 guarded (unsure images in f32; f32 for the run if most are)"
        else:
            precision_label = precision
        t_pipe = time.perf_counter()
        views = (f"1 view, 8 below one-view confidence {policy.threshold:.4f}" if tta == ADAPTIVE
                 else f"{TTA_VIEWS[tta]} view(s) per image")
        log(f"scoring on {device} ({backend} {precision_label}), {cfg.num_actors} actor(s), batch "
            f"{cfg.gpu_batch_size if device == 'cuda' else cfg.batch_size}, decode in {decode}, tta {tta} ({views}); commits every {cfg.commit_every_files} files or "
            f"{cfg.commit_every_minutes:g} min")
        ds = build_dataset(todo, cfg, package_uri, run_id, started, device, backend, num_gpus, precision, tta,
                           run_date=run_date, decode=decode, image_size=int(card["preprocessing"]["image_size"]))
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


def main_summary_json(record: dict[str, Any]) -> str:
    keep = {k: record[k] for k in ("run_id", "run_date", "model_name", "model_version", "model_uri", "input",
                                   "output", "version", "commits", "files", "rows", "counts", "throughput", "driver",
                                   "execution")}
    return json.dumps(keep, indent=2)

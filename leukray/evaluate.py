"""`leukray evaluate`: measure a model package on a labelled folder, and (optionally) its robustness.

Read top to bottom: load the package → list the data and pick the rows (the split manifest's test rows when a
manifest covers the data, else every image) → decode once with the card's image size (`leukray.data`, the same
path as training and scoring) → logits (`backend`: on a CPU the package's ONNX graph under OpenVINO fp32, as
scoring runs it; on a GPU the torch model) → calibrated probabilities (card temperature) →
metrics, review trade-off, plots, `evaluation.json`. With `robustness=True` the same decoded images are re-scored
under every perturbation × severity of `leukray.perturb.PERTURBATIONS`.

Which split manifest is used: `split_manifest=` (an error when it does not cover the data), else the package's
own `split.parquet`, else the `split_manifest` URI recorded in its card. A manifest *covers* the data when every
image of the folder is in it with the same content hash; otherwise the data is not the training data, nothing
in it was trained on, and every image is evaluated (`split_source` in the report says why).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from . import storage
from .config import StorageOptions
from .data import DataError, cached_decode, content_hash, list_labelled_folder, read_all
from .ood import COLOUR_REFERENCE_FILE, REFERENCE_FILE, review_reason
from .tta import package_tta, resolve_tta, with_tta

SPLIT_CHOICES = ("test", "val", "train", "all")
REVIEW_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)
DEFAULT_REVIEW_THRESHOLD = 0.8
"""needs_review threshold when neither the call nor the package names one (card `review_threshold`)."""
PERTURB_CHUNK = 64
"""Perturbations are applied in fixed chunks of this many images (seeded per chunk), independent of
`batch_size`, so robustness numbers depend only on the images, the seed and the package."""
SAMPLE_GRID = 16
EVALUATION_JSON = "evaluation.json"


def log(msg: str) -> None:
    print(f"[leukray] {msg}", file=sys.stderr, flush=True)


@dataclass
class EvalData:
    root: str
    paths: list[str]
    """Paths relative to root, sorted."""
    labels: np.ndarray
    """Indices into the package's classes."""
    images: np.ndarray
    """(N, S, S, 3) uint8, decoded at the package's image size."""
    split: str
    split_source: str
    manifest_uri: str | None
    manifest_hash: str | None


# --------------------------------------------------------------------------------------------------- data


def _candidate_manifests(package_uri: str, card: dict[str, Any], explicit: str | None) -> list[tuple[str, bool]]:
    if explicit:
        return [(explicit, True)]
    out = [(storage.join(package_uri, "split.parquet"), False)]
    recorded = card.get("split_manifest")
    if recorded and recorded not in {u for u, _ in out}:
        out.append((recorded, False))
    return out


def load_eval_data(data_uri: str, classes: list[str], image_size: int, split: str, package_uri: str,
                   card: dict[str, Any], split_manifest: str | None = None,
                   storage_options: StorageOptions | None = None) -> EvalData:
    """List, choose rows, decode (cached). Labels are indices into `classes` (the package's output order)."""
    from .split import load_manifest, manifest_hash

    if split not in SPLIT_CHOICES:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLIT_CHOICES)}")
    listing = list_labelled_folder(data_uri, storage_options)
    unknown = sorted(set(listing.labels) - set(classes))
    if unknown:
        raise DataError(f"{data_uri}: class(es) {unknown} are not outputs of this model (classes {classes})")
    blobs = read_all(data_uri, listing.paths, storage_options)
    hashes = [content_hash(b) for b in blobs]
    have = dict(zip(listing.paths, hashes))

    chosen: pa.Table | None = None
    manifest_uri, source = None, "no split manifest found: every image of the folder"
    for uri, explicit in _candidate_manifests(package_uri, card, split_manifest):
        try:
            if not storage.exists(uri, storage_options):
                if explicit:
                    raise DataError(f"split manifest not found: {uri}")
                continue
            table = load_manifest(uri, storage_options)
        except DataError:
            raise
        except (OSError, ValueError) as err:
            if explicit:
                raise DataError(f"cannot read split manifest {uri}: {err}") from None
            log(f"warning: ignoring unreadable split manifest {uri}: {err}")
            continue
        known = dict(zip(table["path"].to_pylist(), table["hash"].to_pylist()))
        missing = [p for p in listing.paths if p not in known]
        changed = [p for p in listing.paths if p in known and known[p] != have[p]]
        if missing or changed:
            why = (f"{len(missing)} image(s) of {data_uri} are not in it (e.g. {missing[:3]}), "
                   f"{len(changed)} have different content (e.g. {changed[:3]})")
            if explicit:
                raise DataError(f"split manifest {uri} does not cover {data_uri}: {why}; "
                                f"pass the manifest of this data or --split all without --split-manifest")
            log(f"split manifest {uri} does not cover the data ({why}): evaluating every image")
            source = f"{uri} does not cover the data: every image of the folder"
            break
        chosen, manifest_uri = table, uri
        break

    if chosen is not None:
        split_of = dict(zip(chosen["path"].to_pylist(), chosen["split"].to_pylist()))
        if split == "all":
            keep = list(range(len(listing.paths)))
            source = f"every image of the folder (includes the training rows of {manifest_uri})"
        else:
            keep = [i for i, p in enumerate(listing.paths) if split_of[p] == split]
            source = f"{split} rows of {manifest_uri}"
            if not keep:
                raise DataError(f"the {split} split of {manifest_uri} holds none of the images of {data_uri}")
        mhash = manifest_hash(chosen)
    else:
        if split in ("val", "train"):
            raise DataError(f"split={split!r} needs a split manifest covering {data_uri}; none was found "
                            f"(pass --split-manifest, or --split test/all)")
        keep = list(range(len(listing.paths)))
        split, mhash = "all", None

    paths = [listing.paths[i] for i in keep]
    sel_hashes = [hashes[i] for i in keep]
    images = cached_decode(data_uri, paths, sel_hashes, image_size, storage_options,
                           blobs={listing.paths[i]: blobs[i] for i in keep})
    labels = np.array([classes.index(listing.labels[i]) for i in keep], dtype=np.int64)
    return EvalData(data_uri, paths, labels, np.array(images, order="C"),  # writable copy of the cache
                     split, source, manifest_uri, mhash)


# ------------------------------------------------------------------------------------------------ scoring


def _prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


BACKENDS = ("auto", "torch", "openvino")


def make_predictor(pkg: Any, device: torch.device, batch_size: int, backend: str = "auto",
                   storage_options: StorageOptions | None = None,
                   onnx_bytes: bytes | None = None) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """uint8 NHWC images → float32 model outputs (logits, then pooled features where the graph has them:
    `leukray.ood.split_outputs`), and the backend's name. On a CPU `auto` runs the package's ONNX graph
    with OpenVINO in fp32 as scoring does (several times faster than PyTorch there, same numbers to ~1e-6: the
    robustness suite's 10 000+ forward passes take minutes instead of a quarter of an hour); elsewhere PyTorch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "openvino" if device.type == "cpu" and importlib.util.find_spec("openvino") else "torch"
    if backend == "openvino":
        if device.type != "cpu":
            raise ValueError(f"backend=openvino runs on the CPU; device={device} needs backend torch (or auto)")
        from .registry import read_onnx
        from .score import OpenVINOModel, default_threads

        ov_model = OpenVINOModel(onnx_bytes or read_onnx(pkg, storage_options), default_threads(), "f32")
        return (lambda images: ov_model(np.asarray(images, dtype=np.uint8))), "openvino f32"

    from .train import predict_outputs

    model = _prepare_model(pkg.model, device)
    return (lambda images: predict_outputs(model, images, device, batch_size,
                                           channels_last=device.type == "cuda")), f"torch {device}"


def chunk_seed(seed: int, name: str, severity_index: int, chunk: int) -> int:
    """Seed of one perturbation chunk: a pure function of (seed, perturbation, severity position, chunk)."""
    from .perturb import PERTURBATIONS

    names = list(PERTURBATIONS)
    ss = np.random.SeedSequence([int(seed) % 2**63, names.index(name), severity_index, chunk])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


@dataclass
class Flagger:
    """What scoring does with a model's outputs: calibrated confidence → needs_review below `threshold`, and the
    package's out-of-distribution guard (None: confidence only)."""
    classes: list[str]
    temperature: float
    threshold: float
    guard: Any = None

    def __call__(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        from .calibration import softmax_with_temperature
        from .ood import split_outputs

        logits, features = split_outputs(outputs, len(self.classes))
        probs = softmax_with_temperature(logits, self.temperature)
        conf = probs.max(1)
        low = conf < self.threshold
        if self.guard is not None and features is not None:
            ood_score = self.guard.scores(logits, features)
            ood = ~self.guard.in_distribution(ood_score)
        else:
            ood_score, ood = np.full(len(conf), np.nan), np.zeros(len(conf), bool)
        return {"pred": probs.argmax(1), "probs": probs, "confidence": conf, "low_confidence": low,
                "ood_score": ood_score, "ood": ood, "needs_review": low | ood}


def silent_errors(labels: np.ndarray, pred: np.ndarray, flagged: np.ndarray) -> dict[str, Any]:
    """Errors nobody is told about: wrong and not flagged for review; and how many of them cross benign ↔ malignant."""
    from .metrics import BENIGN_INDEX

    silent = (pred != labels) & ~flagged
    crossing = silent & ((labels == BENIGN_INDEX) != (pred == BENIGN_INDEX))
    return {"silent_error_rate": float(silent.mean()) if len(labels) else 0.0,
            "silent_benign_malignant": int(crossing.sum())}


def robustness_suite(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray,
                     classes: list[str], batch_size: int, seed: int = 0, flagger: Flagger | None = None,
                     clean_outputs: np.ndarray | None = None) -> dict[str, Any]:
    """Per perturbation × severity: accuracy, macro-F1 and — what a lab lives with — the fraction flagged for review
    (low confidence or out of distribution), the fraction out of distribution, and the silent error rate (wrong
    and not flagged) with the silent benign ↔ malignant count; `silent_error_rate_confidence_only` is the same
    without the guard. The decoded images are perturbed chunk by chunk; `predict` returns model outputs."""
    from sklearn.metrics import f1_score

    from .perturb import PERTURBATIONS, apply_perturbation

    t0 = time.time()
    labels_idx = list(range(len(classes)))
    flagger = flagger or Flagger(classes, 1.0, 0.0)

    def summary(f: dict[str, np.ndarray]) -> dict[str, Any]:
        pred = f["pred"]
        return {"accuracy": float((pred == labels).mean()),
                "macro_f1": float(f1_score(labels, pred, labels=labels_idx, average="macro", zero_division=0)),
                "flagged_fraction": float(f["needs_review"].mean()),
                "ood_fraction": float(f["ood"].mean()),
                **silent_errors(labels, pred, f["needs_review"]),
                "silent_error_rate_confidence_only": silent_errors(labels, pred, f["low_confidence"])["silent_error_rate"]}

    if clean_outputs is None:
        clean_outputs = predict(images)
    clean_f = flagger(clean_outputs)
    clean = summary(clean_f)
    settings = [(name, k, severity) for name, severities in PERTURBATIONS.items() for k, severity in enumerate(severities)]
    n = len(images)
    keys = ("pred", "low_confidence", "ood", "needs_review")
    flags = {key: np.empty((len(settings), n), dtype=np.int64 if key == "pred" else bool) for key in keys}

    # Perturbed chunks of every setting stream into shared model batches: small evaluation sets still fill
    # whole batches (one forward pass per batch_size images, not per setting), and memory stays one batch.
    pending: list[tuple[int, int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        out = flagger(predict(np.concatenate([b for _, _, b in pending])))
        at = 0
        for s_i, start, b in pending:
            for key in keys:
                flags[key][s_i, start:start + len(b)] = out[key][at:at + len(b)]
            at += len(b)
        pending.clear()

    for s_i, (name, k, severity) in enumerate(settings):
        for c, start in enumerate(range(0, n, PERTURB_CHUNK)):
            batch = apply_perturbation(images[start:start + PERTURB_CHUNK], name, severity,
                                       seed=chunk_seed(seed, name, k, c))
            pending.append((s_i, start, batch))
            if sum(len(b) for _, _, b in pending) >= batch_size:
                flush()
    flush()
    rows: list[dict[str, Any]] = []
    for s_i, (name, _k, severity) in enumerate(settings):
        s = summary({key: flags[key][s_i] for key in keys})
        rows.append({"perturbation": name, "severity": severity, **s,
                     "accuracy_drop": clean["accuracy"] - s["accuracy"],
                     "changed_fraction": float((flags["pred"][s_i] != clean_f["pred"]).mean()), "n": int(n)})
    worst = min(rows, key=lambda r: (r["accuracy"], r["macro_f1"]))
    by_perturbation = {}
    for name in PERTURBATIONS:
        rs = [r for r in rows if r["perturbation"] == name]
        w = min(rs, key=lambda r: (r["accuracy"], r["macro_f1"]))
        by_perturbation[name] = {"mean_accuracy": float(np.mean([r["accuracy"] for r in rs])),
                                 "worst_severity": w["severity"], "worst_accuracy": w["accuracy"],
                                 "worst_macro_f1": w["macro_f1"],
                                 "max_silent_error_rate": max(r["silent_error_rate"] for r in rs),
                                 "silent_benign_malignant": sum(r["silent_benign_malignant"] for r in rs),
                                 "max_flagged_fraction": max(r["flagged_fraction"] for r in rs)}
    return {"seed": int(seed), "review_threshold": flagger.threshold,
            "guard": None if flagger.guard is None else flagger.guard.method,
            "clean": clean, "results": rows, "worst": dict(worst),
            "worst_silent": dict(max(rows, key=lambda r: (r["silent_error_rate"], r["silent_benign_malignant"]))),
            "max_flagged": dict(max(rows, key=lambda r: r["flagged_fraction"])),
            "by_perturbation": by_perturbation, "wall_time_s": time.time() - t0}


def format_robustness_table(rob: dict[str, Any]) -> str:
    """Compact text table: one line per perturbation, accuracy at each severity (mildest first)."""
    lines = [f"robustness (n={rob['results'][0]['n'] if rob['results'] else 0}, seed {rob['seed']}): "
             f"clean accuracy {rob['clean']['accuracy']:.3f}, macro-F1 {rob['clean']['macro_f1']:.3f}",
             f"{'perturbation':<18} severity:accuracy/silent error rate/flagged fraction"]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rob["results"]:
        by.setdefault(r["perturbation"], []).append(r)
    for name, rs in by.items():
        cells = "  ".join(f"{r['severity']:g}:{r['accuracy']:.3f}/{r['silent_error_rate']:.3f}/{r['flagged_fraction']:.2f}"
                          for r in rs)
        lines.append(f"{name:<18} {cells}")
    w, ws, wf = rob["worst"], rob["worst_silent"], rob["max_flagged"]
    lines.append(f"worst: {w['perturbation']} {w['severity']:g} accuracy {w['accuracy']:.3f} "
                 f"(drop {w['accuracy_drop']:+.3f}), macro-F1 {w['macro_f1']:.3f}; most silent errors: "
                 f"{ws['perturbation']} {ws['severity']:g} {ws['silent_error_rate']:.3f} "
                 f"({ws['silent_benign_malignant']} benign<->malignant); most flagged: {wf['perturbation']} "
                 f"{wf['severity']:g} {wf['flagged_fraction']:.3f}")
    return "\n".join(lines)


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def _sample_indices(correct: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to n/2 mistakes (they are what a reviewer wants to see), filled with correct ones; seeded, sorted."""
    rng = np.random.default_rng(seed)
    wrong, right = np.flatnonzero(~correct), np.flatnonzero(correct)
    take_wrong = min(len(wrong), n // 2)
    take_right = min(len(right), n - take_wrong)
    take_wrong = min(len(wrong), n - take_right)
    pick = np.concatenate([rng.choice(wrong, take_wrong, replace=False), rng.choice(right, take_right, replace=False)])
    return np.sort(pick.astype(np.int64))


# ------------------------------------------------------------------------------------------------ evaluate


def evaluate(model_ref: str, data_uri: str, out_dir: str, split: str = "test",
             storage: StorageOptions | None = None, robustness: bool = False, seed: int = 0,
             batch_size: int = 64, split_manifest: str | None = None, review_threshold: float | None = None,
             device: str = "auto", plots: bool = True, backend: str = "auto", tta: str = "package",
             ood_dirs: list[str] | None = None) -> dict[str, Any]:
    """Evaluate a model package on a labelled folder; write evaluation.json, predictions.csv, the plots
    (confusion_matrix.png, reliability.png, samples.png; skipped with plots=False) and, with robustness,
    robustness.csv to out_dir. `seed` fixes the random perturbations and the sample grid. `tta`: the package's
    test-time augmentation (`package`) or another mode (`leukray.tta`); the robustness suite runs with it too.
    `ood_dirs`: folders of images that are not in-distribution smears; each is scored against the evaluated
    split (AUROC, flagged fraction; ood.csv, ood_scores.png).

    Returns the report written to `<out_dir>/evaluation.json`."""
    from . import storage as st
    from .metrics import classification_metrics, review_tradeoff
    from .ood import load_guard
    from .plots import plot_confusion_matrix, plot_reliability, plot_sample_grid
    from .registry import load_package
    from .train import select_device

    t0 = time.time()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pkg = load_package(model_ref, storage)
    classes = pkg.classes
    tta_mode, tta_package = resolve_tta(tta, pkg.card), package_tta(pkg.card)
    data = load_eval_data(data_uri, classes, pkg.image_size, split, pkg.uri, pkg.card, split_manifest, storage)
    n = len(data.paths)
    log(f"evaluate: {pkg.name} {pkg.version} on {n} image(s) of {data_uri} ({data.split_source})")

    dev = select_device(device)
    predict, backend_name = make_predictor(pkg, dev, batch_size, backend, storage)
    predict = with_tta(predict, tta_mode)
    if tta_mode != tta_package:
        log(f"evaluate: tta={tta_mode}, but the package's temperature was fitted with tta={tta_package}: "
            f"confidences may be off (refit: leukray calibrate --tta {tta_mode})")
    outputs = predict(data.images)
    guard = load_guard(pkg.uri, pkg.card, storage)
    if guard is None:
        log("evaluate: this package has no out-of-distribution guard (add one: leukray calibrate); "
            "needs_review is low confidence alone")
    elif outputs.shape[1] == len(classes):
        log("evaluate: this package's ONNX graph has no features output (re-export: leukray calibrate); "
            "needs_review is low confidence alone")
        guard = None

    if review_threshold is not None:
        threshold, threshold_source = float(review_threshold), "argument"
    elif pkg.card.get("review_threshold") is not None:
        threshold, threshold_source = float(pkg.card["review_threshold"]), "model card"
    else:
        threshold, threshold_source = DEFAULT_REVIEW_THRESHOLD, "default"
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"review threshold must be in [0, 1], got {threshold}")
    flagger = Flagger(classes, pkg.temperature, threshold, guard)
    flags = flagger(outputs)
    probs, pred = flags["probs"], flags["pred"]
    metrics = classification_metrics(data.labels, probs, classes)
    thresholds = sorted(set(REVIEW_THRESHOLDS) | {threshold})
    table = review_tradeoff(data.labels, probs, thresholds)
    at = next(r for r in table if r["threshold"] == threshold)
    wrong = pred != data.labels

    report: dict[str, Any] = {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro"]["f1"],
        "n": n,
        "model": {"name": pkg.name, "version": pkg.version, "uri": pkg.uri, "image_size": pkg.image_size,
                  "temperature": pkg.temperature, "classes": classes},
        "data": data_uri,
        "split": data.split,
        "split_source": data.split_source,
        "split_manifest": data.manifest_uri,
        "split_manifest_hash": data.manifest_hash,
        "same_split_as_training": (data.manifest_hash == pkg.card.get("split_manifest_hash")
                                   if data.manifest_hash else None),
        "metrics": metrics,
        "review": {"threshold": threshold, "threshold_source": threshold_source, **at, "tradeoff": table,
                   "with_guard": {"flagged_fraction": float(flags["needs_review"].mean()),
                                  "ood_fraction": float(flags["ood"].mean()),
                                  "errors_caught_fraction": (float(flags["needs_review"][wrong].mean())
                                                             if wrong.any() else None),
                                  **silent_errors(data.labels, pred, flags["needs_review"])}},
        "ood": None if guard is None else {"method": guard.method, "k": guard.k, "threshold": guard.threshold,
                                           "flagged_fraction": float(flags["ood"].mean())},
        "seed": int(seed),
        "backend": backend_name,
        "tta": tta_mode,
        "tta_package": tta_package,
    }

    rob = None
    if robustness:
        rob = robustness_suite(predict, data.images, data.labels, classes, batch_size, seed, flagger=flagger,
                               clean_outputs=outputs)
        report["robustness"] = rob
        log(format_robustness_table(rob))

    ood_report = None
    if ood_dirs:
        if guard is None:
            raise ValueError(f"--ood needs a package with an out-of-distribution guard; {pkg.uri} has none "
                             "(add one: leukray calibrate)")
        ood_report = ood_folders(predict, flagger, outputs, ood_dirs, pkg.image_size, storage)
        report["ood_folders"] = ood_report
        log(format_ood_table(ood_report))

    report["wall_time_s"] = time.time() - t0
    reasons = review_reason(flags["low_confidence"], flags["ood"])
    predictions = [{"path": p, "actual": classes[int(y)], "predicted": classes[int(q)], "confidence": float(c),
                    "needs_review": bool(r is not None), "review_reason": r or "",
                    "ood_score": "" if np.isnan(o) else float(o), "correct": bool(y == q)}
                   for p, y, q, c, r, o in zip(data.paths, data.labels, pred, flags["confidence"], reasons,
                                               flags["ood_score"])]
    with tempfile.TemporaryDirectory() as tmp:
        if plots:
            plot_confusion_matrix(metrics["confusion_matrix"], classes, os.path.join(tmp, "confusion_matrix.png"),
                                  title=f"{pkg.name} {pkg.version}: {data.split} (n={n}, accuracy {metrics['accuracy']:.3f})")
            plot_reliability(data.labels, probs, os.path.join(tmp, "reliability.png"))
            idx = _sample_indices(pred == data.labels, SAMPLE_GRID, seed)
            plot_sample_grid(data.images[idx], data.labels[idx], pred[idx], classes, os.path.join(tmp, "samples.png"),
                             n=len(idx))
        if ood_report is not None:
            from .plots import plot_ood_scores

            plot_ood_scores(ood_report["scores"], ood_report["thresholds"], os.path.join(tmp, "ood_scores.png"))
            with open(os.path.join(tmp, "ood.csv"), "w") as fh:
                fh.write(_csv_text(ood_report["folders"], OOD_COLUMNS))
            del ood_report["scores"]
        with open(os.path.join(tmp, "predictions.csv"), "w") as fh:
            fh.write(_csv_text(predictions, ["path", "actual", "predicted", "confidence", "needs_review",
                                             "review_reason", "ood_score", "correct"]))
        if rob is not None:
            with open(os.path.join(tmp, "robustness.csv"), "w") as fh:
                fh.write(_csv_text(rob["results"], ROBUSTNESS_COLUMNS))
        st.write_json(os.path.join(tmp, EVALUATION_JSON), report)
        st.upload_dir(tmp, out_dir, storage)
    wg = report["review"]["with_guard"]
    log(f"evaluate: accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro']['f1']:.4f}  ECE {metrics['ece']:.4f}  "
        f"review<{threshold:g}: {at['flagged_fraction']:.1%} flagged, "
        f"{'n/a' if at['errors_caught_fraction'] is None else format(at['errors_caught_fraction'], '.1%')} of errors "
        f"caught; with the guard {wg['flagged_fraction']:.1%} flagged ({wg['ood_fraction']:.1%} out of distribution), "
        f"silent errors {wg['silent_error_rate']:.1%}  → {out_dir}")
    return report


ROBUSTNESS_COLUMNS = ["perturbation", "severity", "accuracy", "macro_f1", "flagged_fraction", "ood_fraction",
                      "silent_error_rate", "silent_benign_malignant", "silent_error_rate_confidence_only",
                      "accuracy_drop", "changed_fraction", "n"]
OOD_COLUMNS = ["folder", "n", "unreadable", "knn_auroc", "knn_flagged_fraction", "msp_auroc", "msp_flagged_fraction",
               "energy_auroc", "energy_flagged_fraction", "needs_review_fraction"]


def ood_folders(predict: Callable[[np.ndarray], np.ndarray], flagger: Flagger, in_outputs: np.ndarray,
                dirs: list[str], image_size: int, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """Each folder of not-in-distribution images against the evaluated (in-distribution) split: AUROC and the
    fraction flagged at the package's thresholds, per method, side by side."""
    from .data import read_images_folder
    from .ood import METHODS, auroc, split_outputs

    guard = flagger.guard
    k = len(flagger.classes)
    in_logits, in_feats = split_outputs(in_outputs, k)
    in_scores = {m: guard.scores(in_logits, in_feats, m) for m in METHODS}
    scores = {"in-distribution": in_scores}
    rows = []
    for d in dirs:
        images, unreadable = read_images_folder(d, image_size, storage_options)
        if not len(images):
            raise DataError(f"--ood {d}: no readable image ({len(unreadable)} unreadable)")
        out = predict(images)
        logits, feats = split_outputs(out, k)
        row: dict[str, Any] = {"folder": d, "n": int(len(images)), "unreadable": len(unreadable)}
        scores[d] = {}
        for m in METHODS:
            sc = guard.scores(logits, feats, m)
            scores[d][m] = sc
            row[f"{m}_auroc"] = auroc(in_scores[m], sc)
            row[f"{m}_flagged_fraction"] = float((~guard.in_distribution(sc, m)).mean())
        row["needs_review_fraction"] = float(flagger(out)["needs_review"].mean())
        rows.append(row)
    return {"method": guard.method, "thresholds": dict(guard.thresholds),
            "in_distribution": {"n": int(len(in_logits)),
                                **{f"{m}_flagged_fraction": float((~guard.in_distribution(in_scores[m], m)).mean())
                                   for m in METHODS}},
            "folders": rows, "scores": scores}


def format_ood_table(rep: dict[str, Any]) -> str:
    i = rep["in_distribution"]
    lines = [f"out-of-distribution folders (in-distribution split: {i['n']} images, flagged knn {i['knn_flagged_fraction']:.1%}"
             f" / msp {i['msp_flagged_fraction']:.1%} / energy {i['energy_flagged_fraction']:.1%})",
             f"{'folder':<40} {'n':>5}  {'knn AUROC':>9} {'flagged':>7}  {'msp AUROC':>9} {'flagged':>7}  "
             f"{'energy AUROC':>12} {'flagged':>7}"]
    for r in rep["folders"]:
        lines.append(f"{r['folder'][-40:]:<40} {r['n']:>5}  {r['knn_auroc']:>9.4f} {r['knn_flagged_fraction']:>7.1%}  "
                     f"{r['msp_auroc']:>9.4f} {r['msp_flagged_fraction']:>7.1%}  {r['energy_auroc']:>12.4f} "
                     f"{r['energy_flagged_fraction']:>7.1%}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ calibrate


def calibrate(model_ref: str, data_uri: str, out_dir: str, split: str = "val", storage: StorageOptions | None = None,
              batch_size: int = 64, split_manifest: str | None = None, device: str = "auto",
              backend: str = "auto", tta: str = "package", ood: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refit a package's temperature and out-of-distribution guard on labelled images and write the package,
    with the new card, to out_dir.

    Why: a lab's own images (stain, camera) shift confidences; refitting T on a labelled sample of them makes
    `confidence` and `needs_review` mean what they say there. Default split `val`: the training split's val rows
    when the package's manifest covers the data, else every image. The weights are copied unchanged (the argmax,
    so accuracy, cannot move); the card records the old temperature and where the new one was fitted. `tta`: fit
    for another test-time augmentation mode (e.g. `none` for a package that scores 8× faster); the new card's
    `tta` is that mode.

    The guard (`leukray.ood`): its reference is the training split's features when the package's manifest covers
    the data (so a package trained before the guard gets one without retraining), else the package's own
    reference; its thresholds are fitted on the same images as T. A graph exported without the features output
    is re-exported from the weights. `ood`: OODConfig keys (method, k, in_fraction) overriding the package's."""
    import datetime as dt

    from . import storage as st
    from .calibration import FIT_DESCRIPTION, fit_temperature, nll_with_temperature
    from .ood import OODConfig, fit_guard, load_guard, save_reference, split_outputs
    from .registry import CARD, ONNX, export_onnx, load_package, read_onnx
    from .train import select_device

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pkg = load_package(model_ref, storage)
    if out_dir.rstrip("/") == pkg.uri.rstrip("/") or (not st.is_remote(out_dir) and not st.is_remote(pkg.uri)
                                                      and os.path.abspath(out_dir) == os.path.abspath(pkg.uri)):
        raise ValueError(f"--out {out_dir} is the package itself; write the recalibrated package to a new folder "
                         "(a package, once written or published, is never changed in place)")
    tta_before = package_tta(pkg.card)
    tta_mode = resolve_tta(tta, pkg.card)
    k = len(pkg.classes)
    old_guard = load_guard(pkg.uri, pkg.card, storage)
    ood_cfg = OODConfig.model_validate({**({kk: pkg.card["ood"][kk] for kk in ("method", "k", "in_fraction")}
                                           if pkg.card.get("ood") else {}),
                                        **({"augmented_copies": pkg.card["ood"]["reference_made"]["augmented_copies"]}
                                           if (pkg.card.get("ood") or {}).get("reference_made") else {}),
                                        **(ood or {})})
    data = load_eval_data(data_uri, pkg.classes, pkg.image_size, split, pkg.uri, pkg.card, split_manifest, storage)
    with tempfile.TemporaryDirectory() as tmp:
        import onnx

        onnx_bytes = read_onnx(pkg, storage)
        reexported = len(onnx.load_from_string(onnx_bytes).graph.output) < 3
        if reexported:  # exported before the graph returned its features and colour signature
            export_onnx(pkg.model, pkg.image_size, os.path.join(tmp, ONNX))
            with open(os.path.join(tmp, ONNX), "rb") as fh:
                onnx_bytes = fh.read()
        predict, backend_name = make_predictor(pkg, select_device(device), batch_size, backend, storage, onnx_bytes)
        predict = with_tta(predict, tta_mode)
        logits, features = split_outputs(predict(data.images), k)
        temperature = fit_temperature(logits, data.labels)
        summary = {
            "temperature_before": pkg.temperature, "temperature": temperature,
            "tta_before": tta_before, "tta": tta_mode,
            "nll_before": nll_with_temperature(logits, data.labels, pkg.temperature),
            "nll": nll_with_temperature(logits, data.labels, temperature),
            "n": len(data.paths), "errors": int((logits.argmax(1) != data.labels).sum()),
            "data": data_uri, "split": data.split, "split_source": data.split_source, "backend": backend_name,
            "source_package": pkg.uri, "at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "fit": FIT_DESCRIPTION, "onnx_reexported": reexported,
        }
        colour_ref = colour_val = None
        if data.manifest_uri is not None and data.split != "train":
            from .train import colour_envelopes, guard_reference

            train = load_eval_data(data_uri, pkg.classes, pkg.image_size, "train", pkg.uri, pkg.card,
                                   data.manifest_uri, storage)
            tc = pkg.card.get("config") or {}
            reference, made = guard_reference(lambda images: split_outputs(predict(images), k)[1], train.images,
                                              ood_cfg, tc.get("augment", "none"), float(tc.get("augment_strength", 1.0)),
                                              float(tc.get("augment_zoom", 1.0)), int(tc.get("seed", 0)))
            colour_ref, colour_val = colour_envelopes(train.images, data.images, ood_cfg, int(tc.get("seed", 0)))
            ref_source = f"train rows of {data.manifest_uri}"
        elif old_guard is not None:
            reference, ref_source = old_guard.reference, f"the reference of {pkg.uri}"
            made = old_guard.fitted.get("reference_made")
            colour_ref = old_guard.colour_reference
            if colour_ref is not None and ood_cfg.colour_check:
                from .colour import signature_envelope

                colour_val = signature_envelope(data.images, 3000, ood_cfg.colour_copies)
        else:
            reference, ref_source, made = None, None, None
            log(f"calibrate: warning: {data_uri} is not covered by the package's split manifest and the package has "
                "no guard yet: no out-of-distribution guard (calibrate on the training data to add one)")
        card = dict(pkg.card, temperature=temperature, tta=tta_mode, calibration=summary)
        card.pop("ood", None)
        guard = None
        if reference is not None:
            guard = fit_guard(reference, logits, features, temperature, ood_cfg,
                              fitted={"split": data.split, "n_val": len(data.paths), "data": data_uri,
                                      "reference_split": ref_source, "reference_made": made, "tta": tta_mode},
                              colour_reference=colour_ref, colour_val=colour_val)
            card["ood"] = guard.card()
            summary["ood"] = {"method": guard.method, "threshold": guard.threshold,
                              "threshold_before": old_guard.threshold if old_guard is not None else None}
        fs, path = st.filesystem(pkg.uri, storage)
        copied = ({CARD} | ({ONNX} if reexported else set())
                  | ({REFERENCE_FILE, COLOUR_REFERENCE_FILE} if guard is not None else set()))
        for entry in fs.ls(path, detail=True):
            name = os.path.basename(entry["name"].rstrip("/"))
            if entry["type"] == "file" and name not in copied:
                fs.get_file(entry["name"], os.path.join(tmp, name))
        if guard is not None:
            save_reference(guard, tmp)
        st.write_json(os.path.join(tmp, CARD), card)
        st.upload_dir(tmp, out_dir, storage)
    log(f"calibrate: T {pkg.temperature:.4g} → {temperature:.4g} (tta {tta_before} → {tta_mode}) on {summary['n']} image(s) of {data_uri} "
        f"({data.split}, {summary['errors']} error(s)); NLL {summary['nll_before']:.4f} → {summary['nll']:.4f}"
        + (f"; guard {guard.method} threshold {guard.threshold:.4g} (reference: {ref_source})" if guard else "")
        + f"  → {out_dir}")
    return {"out": out_dir, **summary}

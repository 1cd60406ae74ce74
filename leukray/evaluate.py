"""`leukray evaluate`: measure a model package on a labelled folder, and (optionally) its robustness.

Read top to bottom: load the package → list the data and pick the rows (the split manifest's test rows when a
manifest covers the data, else every image) → decode once with the card's image size (`leukray.data`, the same
path as training and scoring) → outputs over the test-time views (`leukray.inference`; `backend`: on a CPU the
package's ONNX graph under OpenVINO fp32, as scoring runs it; on a GPU the torch model) → calibrated
probabilities (each row with the temperature of the path it took) →
metrics, review trade-off, plots, `evaluation.json`. With `robustness=True` the same decoded images are re-scored
under every perturbation × severity of `leukray.perturb.PERTURBATIONS`.

Which split manifest is used: `split_manifest=` (an error when it does not cover the data), else the package's
own `split.parquet`, else the `split_manifest` URI recorded in its card. A manifest *covers* the data when every
image of the folder is in it with the same content hash; otherwise the data is not the training data, nothing
in it was trained on, and every image is evaluated (`split_source` in the report says why).
"""

from __future__ import annotations

import csv
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .config import StorageOptions
from .data import DataError, cached_decode, content_hash, list_labelled_folder, read_all, warn_unreadable
from .inference import Predictor, ViewPolicy, package_backend
from .tta import package_tta
from .ood import DEFAULT_BENIGN_MALIGNANT_THRESHOLD, check_names, review_reason
from .robustness import (OOD_COLUMNS, ROBUSTNESS_COLUMNS, Flagger, check_families, format_ood_table,
                         format_robustness_table, ood_folders, robustness_suite, silent_errors)

SPLIT_CHOICES = ("test", "val", "train", "all")
REVIEW_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)
DEFAULT_REVIEW_THRESHOLD = 0.8
"""needs_review threshold when neither the call nor the package names one (card `review_threshold`)."""
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
    unreadable: dict[str, str] = field(default_factory=dict)
    """Files of the chosen rows left out because they do not decode, with the reason."""


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
        if split != "all":  # a lab's own labelled folder: every image is new to the model
            log(f"no split manifest covers {data_uri}: using every image of the folder ({split} rows need the "
                f"manifest the package was split with: --split-manifest)")
        keep = list(range(len(listing.paths)))
        split, mhash = "all", None

    paths = [listing.paths[i] for i in keep]
    sel_hashes = [hashes[i] for i in keep]
    images, unreadable = cached_decode(data_uri, paths, sel_hashes, image_size, storage_options,
                                       blobs={listing.paths[i]: blobs[i] for i in keep})
    warn_unreadable(data_uri, unreadable)
    ok = [j for j, p in enumerate(paths) if p not in unreadable]
    labels = np.array([classes.index(listing.labels[keep[j]]) for j in ok], dtype=np.int64)
    if not ok:
        raise DataError(f"{data_uri}: none of the {len(paths)} image(s) to evaluate decodes")
    return EvalData(data_uri, [paths[j] for j in ok], labels,
                    np.array(images[ok] if unreadable else images, order="C"),  # writable copy of the cache
                    split, source, manifest_uri, mhash, unreadable)


# ------------------------------------------------------------------------------------------------ scoring



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
             ood_dirs: list[str] | None = None, benign_malignant_threshold: float | None = None,
             perturbations: list[str] | None = None) -> dict[str, Any]:
    """Evaluate a model package on a labelled folder; write evaluation.json, predictions.csv, the plots
    (confusion_matrix.png, reliability.png, samples.png; skipped with plots=False) and, with robustness,
    robustness.csv to out_dir (`perturbations`: only these families; `FAMILY=S1,S2` at these severities, e.g. past
    the suite's strongest). `seed` fixes the random perturbations and the sample grid. `tta`: the package's
    test-time augmentation (`package`) or another mode (`leukray.tta`); the robustness suite runs with it too.
    `ood_dirs`: folders of images that are not in-distribution smears; each is scored against the evaluated split
    (AUROC, flagged fraction; ood.csv, ood_scores.png). `review_threshold` and
    `benign_malignant_threshold` decide needs_review as scoring does (`leukray.ood.low_confidence`; default: the
    card's, else 0.8 and 0.9).

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
    families = None
    if perturbations is not None:  # a subset of the suite: checked before anything is loaded
        families, robustness = check_families(perturbations), True
    pkg = load_package(model_ref, storage)
    classes = pkg.classes
    policy, tta_package = ViewPolicy.from_card(pkg.card, tta), package_tta(pkg.card)
    tta_mode = policy.mode
    data = load_eval_data(data_uri, classes, pkg.image_size, split, pkg.uri, pkg.card, split_manifest, storage)
    n = len(data.paths)
    log(f"evaluate: {pkg.name} {pkg.version} on {n} image(s) of {data_uri} ({data.split_source})")

    dev = select_device(device)
    model, backend_name = package_backend(pkg, dev, batch_size, backend, storage)
    predict = Predictor(model, policy, len(classes))
    if not policy.calibrated:
        log(f"evaluate: tta={tta_mode}, but the package's temperature was fitted with tta={tta_package}: "
            f"confidences may be off (refit: leukray calibrate --tta {tta_mode})")
    outputs = predict(data.images)
    guard = load_guard(pkg.uri, pkg.card, storage)
    if guard is None:
        log("evaluate: this package has no out-of-distribution guard (add one: leukray calibrate); "
            "needs_review is low confidence alone")
    elif outputs.values.shape[1] == len(classes):
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
    if benign_malignant_threshold is None:
        benign_malignant_threshold = float(pkg.card.get("benign_malignant_threshold",
                                                        DEFAULT_BENIGN_MALIGNANT_THRESHOLD))
    if not 0.0 <= benign_malignant_threshold <= 1.0:
        raise ValueError(f"benign-malignant threshold must be in [0, 1], got {benign_malignant_threshold}")
    flagger = Flagger(classes, threshold, guard, benign_malignant_threshold)
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
        "unreadable": data.unreadable,
        "split": data.split,
        "split_source": data.split_source,
        "split_manifest": data.manifest_uri,
        "split_manifest_hash": data.manifest_hash,
        "same_split_as_training": (data.manifest_hash == pkg.card.get("split_manifest_hash")
                                   if data.manifest_hash else None),
        "metrics": metrics,
        "review": {"threshold": threshold, "threshold_source": threshold_source, **at, "tradeoff": table,
                   "benign_malignant_threshold": benign_malignant_threshold,
                   "with_guard": {"flagged_fraction": float(flags["needs_review"].mean()),
                                  "ood_fraction": float(flags["ood"].mean()),
                                  "errors_caught_fraction": (float(flags["needs_review"][wrong].mean())
                                                             if wrong.any() else None),
                                  **silent_errors(data.labels, pred, flags["needs_review"])}},
        "ood": None if guard is None else {"method": guard.method, "k": guard.k, "threshold": guard.threshold,
                                           "flagged_fraction": float(flags["ood"].mean()),
                                           "shift": (None if flags.get("above_median") is None
                                                     else float(flags["above_median"].mean())),
                                           "ood_by_check": {name: float(v.mean())
                                                            for name, v in flags["ood_by_check"].items()}},
        "seed": int(seed),
        "backend": backend_name,
        "tta": tta_mode,
        "tta_package": tta_package,
        "views": {"mean": float(outputs.views.mean()) if n else 0.0,
                  "rescored_fraction": float((outputs.views > 1).mean()) if n and tta_mode == "adaptive" else None,
                  "temperature": policy.temperature, "temperature_one_view": policy.temperature_one_view,
                  "threshold": policy.threshold if tta_mode == "adaptive" else None},
    }

    rob = None
    if robustness:
        rob = robustness_suite(predict, data.images, data.labels, classes, batch_size, seed, flagger=flagger,
                               clean_outputs=outputs, families=families)
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
                    "ood_score": "" if np.isnan(o) else float(o), "ood_check": why or "", "views": int(v),
                    "correct": bool(y == q)}
                   for p, y, q, c, r, o, why, v in zip(data.paths, data.labels, pred, flags["confidence"], reasons,
                                                       flags["ood_score"], check_names(flags["ood_by_check"])
                                                       or [None] * n, outputs.views)]
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
                rows = [{**r, **{f"ood_by_{c}": f for c, f in r["ood_by_check"].items()}}
                        for r in ood_report["folders"]]
                checks = [f"ood_by_{c}" for c in ood_report["in_distribution"]["ood_by_check"]]
                fh.write(_csv_text(rows, OOD_COLUMNS + checks))
            del ood_report["scores"]
        with open(os.path.join(tmp, "predictions.csv"), "w") as fh:
            fh.write(_csv_text(predictions, ["path", "actual", "predicted", "confidence", "needs_review",
                                             "review_reason", "ood_score", "ood_check", "views", "correct"]))
        if rob is not None:
            with open(os.path.join(tmp, "robustness.csv"), "w") as fh:
                rows = [{**r, **{f"ood_by_{c}": f for c, f in r["ood_by_check"].items()}} for r in rob["results"]]
                checks = [f"ood_by_{c}" for c in rob["clean"]["ood_by_check"]]
                fh.write(_csv_text(rows, ROBUSTNESS_COLUMNS + checks))
        st.write_json(os.path.join(tmp, EVALUATION_JSON), report)
        st.upload_dir(tmp, out_dir, storage)
    wg = report["review"]["with_guard"]
    log(f"evaluate: tta {tta_mode} ({report['views']['mean']:.2f} views per image)  accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro']['f1']:.4f}  ECE {metrics['ece']:.4f}  "
        f"review<{threshold:g}: {at['flagged_fraction']:.1%} flagged, "
        f"{'n/a' if at['errors_caught_fraction'] is None else format(at['errors_caught_fraction'], '.1%')} of errors "
        f"caught; with the guard {wg['flagged_fraction']:.1%} flagged ({wg['ood_fraction']:.1%} out of distribution), "
        f"silent errors {wg['silent_error_rate']:.1%}  → {out_dir}")
    return report



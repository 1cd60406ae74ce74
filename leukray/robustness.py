"""How a package behaves off its clean test images: the robustness suite (accuracy, review flags and silent errors
under every perturbation × severity of `leukray.perturb.PERTURBATIONS`) and folders of images that are not
in-distribution smears (the out-of-distribution guard's AUROC and flagged fractions). Both score through the
same `Flagger` as `leukray evaluate`: what scoring does with a model's outputs.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .config import StorageOptions
from .data import DataError
from .inference import Outputs

PERTURB_CHUNK = 64
"""Perturbations are applied in fixed chunks of this many images (seeded per chunk), independent of
`batch_size`, so robustness numbers depend only on the images, the seed and the package."""

def chunk_seed(seed: int, name: str, severity_index: int, chunk: int) -> int:
    """Seed of one perturbation chunk: a pure function of (seed, perturbation, severity position, chunk)."""
    from .perturb import PERTURBATIONS

    names = list(PERTURBATIONS)
    ss = np.random.SeedSequence([int(seed) % 2**63, names.index(name), severity_index, chunk])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def severity_index(name: str, severity: float) -> int:
    """A setting's position for `chunk_seed`: its place in the suite, or for a severity the suite does not have a
    number derived from the value itself (past the suite's), so a setting has the same images however it is asked
    for."""
    from .perturb import PERTURBATIONS

    suite = PERTURBATIONS[name]
    if severity in suite:
        return suite.index(severity)
    return len(suite) + int(np.float64(severity).view(np.uint64) % np.uint64(2**31))


@dataclass
class Flagger:
    """What scoring does with a model's outputs: needs_review when the calibrated confidence is below `threshold`
    or the benign-vs-malignant probability below `benign_malignant_threshold` (`leukray.ood.low_confidence`), or
    when the package's out-of-distribution guard (None: confidence only) flags the image. Each row is calibrated
    with the temperature of the path it took (`leukray.inference.Outputs`)."""
    classes: list[str]
    threshold: float
    guard: Any = None
    benign_malignant_threshold: float = 0.0

    def __call__(self, outputs: Outputs) -> dict[str, np.ndarray]:
        from .ood import low_confidence, split_outputs

        logits, features = split_outputs(outputs.values, len(self.classes))
        probs = outputs.probs(len(self.classes))
        conf = probs.max(1)
        low = low_confidence(probs, self.classes, self.threshold, self.benign_malignant_threshold)
        by_check: dict[str, np.ndarray] = {}
        above = None
        if self.guard is not None and features is not None:
            ood_score, by_check = self.guard.flagged_by(logits, features)
            ood = ~self.guard.in_distribution(ood_score)
            above = self.guard.above_median(ood_score, probs.argmax(1))
        else:
            ood_score, ood = np.full(len(conf), np.nan), np.zeros(len(conf), bool)
        return {"pred": probs.argmax(1), "probs": probs, "confidence": conf, "low_confidence": low,
                "ood_score": ood_score, "ood": ood, "ood_by_check": by_check, "needs_review": low | ood,
                "above_median": above, "views": outputs.views}


def silent_errors(labels: np.ndarray, pred: np.ndarray, flagged: np.ndarray) -> dict[str, Any]:
    """Errors nobody is told about: wrong and not flagged for review; and how many of them cross benign ↔ malignant."""
    from .metrics import BENIGN_INDEX

    silent = (pred != labels) & ~flagged
    crossing = silent & ((labels == BENIGN_INDEX) != (pred == BENIGN_INDEX))
    return {"silent_error_rate": float(silent.mean()) if len(labels) else 0.0,
            "silent_benign_malignant": int(crossing.sum())}


def check_families(families: list[str]) -> dict[str, tuple[float, ...]]:
    """`FAMILY` (the suite's severities) or `FAMILY=S1,S2,…` (these severities, e.g. past the suite's strongest:
    `magnification=0.5,2`) → {family: severities} in the suite's order. An unknown family is an error naming the
    allowed ones, a severity out of the family's range one naming the range; both before any image is read."""
    from .perturb import PERTURBATIONS, apply_perturbation

    chosen: dict[str, tuple[float, ...]] = {}
    unknown = []
    for spec in families:
        name, sep, values = spec.partition("=")
        if name not in PERTURBATIONS:
            unknown.append(name)
            continue
        severities = PERTURBATIONS[name]
        if sep:
            try:
                severities = tuple(int(v) if re.fullmatch(r"[+-]?\d+", v.strip()) else float(v)
                                   for v in values.split(","))
            except ValueError:
                raise ValueError(f"perturbation {spec!r}: severities must be numbers separated by commas, "
                                 f"e.g. {name}={','.join(str(v) for v in PERTURBATIONS[name][-2:])}") from None
            probe = np.zeros((1, 32, 32, 3), np.uint8)
            for v in severities:
                try:
                    apply_perturbation(probe, name, v)
                except ValueError as e:
                    raise ValueError(f"perturbation {spec!r}: {e}") from None
        chosen[name] = tuple(dict.fromkeys(chosen.get(name, ()) + severities))
    if unknown or not families:
        raise ValueError(f"unknown perturbation famil{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(map(repr, unknown)) or '(none given)'}; allowed: {', '.join(PERTURBATIONS)}")
    return {name: chosen[name] for name in PERTURBATIONS if name in chosen}


def robustness_suite(predict: Callable[[np.ndarray], Outputs], images: np.ndarray, labels: np.ndarray,
                     classes: list[str], batch_size: int, seed: int = 0, flagger: Flagger | None = None,
                     clean_outputs: Outputs | None = None,
                     families: dict[str, tuple[float, ...]] | None = None) -> dict[str, Any]:
    """Per perturbation × severity (every family of `leukray.perturb.PERTURBATIONS`, or only `families`' severities,
    as `check_families` returns them: each setting's images are the same either way): accuracy, macro-F1 and — what
    a lab lives with — the fraction flagged for review (low confidence or out of distribution), the fraction out of
    distribution, and the silent error rate (wrong and not flagged) with the silent benign ↔ malignant count;
    `silent_error_rate_confidence_only` is the same without the guard; `mean_views` the forward passes per image
    (adaptive test-time views spend more on perturbed images). The decoded images are perturbed chunk by chunk;
    `predict` returns `Outputs`."""
    from sklearn.metrics import f1_score

    from .perturb import PERTURBATIONS, apply_perturbation

    t0 = time.time()
    labels_idx = list(range(len(classes)))
    flagger = flagger or Flagger(classes, 0.0)

    def summary(f: dict[str, np.ndarray]) -> dict[str, Any]:
        pred = f["pred"]
        return {"accuracy": float((pred == labels).mean()),
                "macro_f1": float(f1_score(labels, pred, labels=labels_idx, average="macro", zero_division=0)),
                "flagged_fraction": float(f["needs_review"].mean()),
                "ood_fraction": float(f["ood"].mean()),
                "ood_by_check": {name: float(v.mean()) for name, v in f["ood_by_check"].items()},
                "shift": None if f.get("above_median") is None else float(f["above_median"].mean()),
                **silent_errors(labels, pred, f["needs_review"]),
                "silent_error_rate_confidence_only": silent_errors(labels, pred, f["low_confidence"])["silent_error_rate"],
                "mean_views": float(f["views"].mean()) if len(pred) else 0.0}

    if clean_outputs is None:
        clean_outputs = predict(images)
    clean_f = flagger(clean_outputs)
    clean = summary(clean_f)
    chosen = dict(PERTURBATIONS) if families is None else families
    settings = [(name, severity_index(name, severity), severity) for name, severities in chosen.items()
                for severity in severities]
    n = len(images)
    keys = ("pred", "low_confidence", "ood", "needs_review", "views") + (
        ("above_median",) if clean_f["above_median"] is not None else ())
    flags = {key: np.empty((len(settings), n), dtype=np.int64 if key in ("pred", "views") else bool) for key in keys}
    by_check = {name: np.empty((len(settings), n), bool) for name in clean_f["ood_by_check"]}

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
            for name in by_check:
                by_check[name][s_i, start:start + len(b)] = out["ood_by_check"][name][at:at + len(b)]
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
        s = summary({**{key: flags[key][s_i] for key in keys},
                     "ood_by_check": {name: v[s_i] for name, v in by_check.items()}})
        rows.append({"perturbation": name, "severity": severity, **s,
                     "accuracy_drop": clean["accuracy"] - s["accuracy"],
                     "changed_fraction": float((flags["pred"][s_i] != clean_f["pred"]).mean()), "n": int(n)})
    worst = min(rows, key=lambda r: (r["accuracy"], r["macro_f1"]))
    by_perturbation = {}
    for name in chosen:
        rs = [r for r in rows if r["perturbation"] == name]
        w = min(rs, key=lambda r: (r["accuracy"], r["macro_f1"]))
        by_perturbation[name] = {"mean_accuracy": float(np.mean([r["accuracy"] for r in rs])),
                                 "worst_severity": w["severity"], "worst_accuracy": w["accuracy"],
                                 "worst_macro_f1": w["macro_f1"],
                                 "max_silent_error_rate": max(r["silent_error_rate"] for r in rs),
                                 "silent_benign_malignant": sum(r["silent_benign_malignant"] for r in rs),
                                 "max_flagged_fraction": max(r["flagged_fraction"] for r in rs)}
    return {"seed": int(seed), "review_threshold": flagger.threshold,
            "benign_malignant_threshold": flagger.benign_malignant_threshold,
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


ROBUSTNESS_COLUMNS = ["perturbation", "severity", "accuracy", "macro_f1", "flagged_fraction", "ood_fraction",
                      "shift", "silent_error_rate", "silent_benign_malignant", "silent_error_rate_confidence_only",
                      "accuracy_drop", "changed_fraction", "mean_views", "n"]
OOD_COLUMNS = ["folder", "n", "unreadable", "knn_auroc", "knn_flagged_fraction", "msp_auroc", "msp_flagged_fraction",
               "energy_auroc", "energy_flagged_fraction", "needs_review_fraction"]


def ood_folders(predict: Callable[[np.ndarray], Outputs], flagger: Flagger, in_outputs: Outputs,
                dirs: list[str], image_size: int, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """Each folder of not-in-distribution images against the evaluated (in-distribution) split: AUROC and the
    fraction flagged at the package's thresholds, per method, side by side; and `ood_by_check`, the fraction each of
    the package's checks flags (`leukray.ood.Guard.flagged_by`: which check catches what)."""
    from .data import read_images_folder
    from .ood import METHODS, auroc, split_outputs

    guard = flagger.guard
    k = len(flagger.classes)
    in_logits, in_feats = split_outputs(in_outputs.values, k)
    in_scores = {m: guard.scores(in_logits, in_feats, m) for m in METHODS}
    scores = {"in-distribution": in_scores}
    rows = []
    for d in dirs:
        images, unreadable = read_images_folder(d, image_size, storage_options)
        if not len(images):
            raise DataError(f"--ood {d}: no readable image ({len(unreadable)} unreadable)")
        out = predict(images)
        logits, feats = split_outputs(out.values, k)
        row: dict[str, Any] = {"folder": d, "n": int(len(images)), "unreadable": len(unreadable)}
        scores[d] = {}
        for m in METHODS:
            sc = guard.scores(logits, feats, m)
            scores[d][m] = sc
            row[f"{m}_auroc"] = auroc(in_scores[m], sc)
            row[f"{m}_flagged_fraction"] = float((~guard.in_distribution(sc, m)).mean())
        f = flagger(out)
        row["needs_review_fraction"] = float(f["needs_review"].mean())
        row["ood_by_check"] = {name: float(v.mean()) for name, v in f["ood_by_check"].items()}
        rows.append(row)
    return {"method": guard.method, "thresholds": dict(guard.thresholds),
            "in_distribution": {"n": int(len(in_logits)),
                                **{f"{m}_flagged_fraction": float((~guard.in_distribution(in_scores[m], m)).mean())
                                   for m in METHODS},
                                "ood_by_check": {name: float(v.mean()) for name, v in
                                                 flagger(in_outputs)["ood_by_check"].items()}},
            "folders": rows, "scores": scores}


def format_ood_table(rep: dict[str, Any]) -> str:
    i = rep["in_distribution"]
    lines = [f"out-of-distribution folders (in-distribution split: {i['n']} images, flagged knn {i['knn_flagged_fraction']:.1%}"
             f" / msp {i['msp_flagged_fraction']:.1%} / energy {i['energy_flagged_fraction']:.1%})",
             f"{'folder':<40} {'n':>5}  {'knn AUROC':>9} {'flagged':>7}  {'msp AUROC':>9} {'flagged':>7}  "
             f"{'energy AUROC':>12} {'flagged':>7}"]
    lines[-1] += "  flagged by check"
    for r in rep["folders"]:
        by = ", ".join(f"{name} {f:.0%}" for name, f in r["ood_by_check"].items())
        lines.append(f"{r['folder'][-40:]:<40} {r['n']:>5}  {r['knn_auroc']:>9.4f} {r['knn_flagged_fraction']:>7.1%}  "
                     f"{r['msp_auroc']:>9.4f} {r['msp_flagged_fraction']:>7.1%}  {r['energy_auroc']:>12.4f} "
                     f"{r['energy_flagged_fraction']:>7.1%}  {by}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ calibrate


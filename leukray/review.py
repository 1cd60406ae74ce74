"""The review page and the labelled folder: how flagged images reach reviewers and their decisions reach training.

`build_page` writes a static, self-contained page (DIR/index.html, the images and Grad-CAM overlays beside it in
DIR/images/; CSS and JavaScript inline, nothing fetched from elsewhere) for the needs-review rows of a results
table, plus an optional random sample of confident rows for audit. Reviewers' decisions stay in the browser
(localStorage) until exported as CSV; `leukray.reviews.import_decisions` brings that CSV back into the `reviews`
table; `export_labelled` writes the reviewed images as a labelled folder (one sub-folder per class) for
`leukray calibrate --data` or `leukray train --data`.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import numpy as np
import pyarrow as pa

from . import CLASSES, storage
from .config import StorageOptions
from .images import ImageDecodeError, decode_image
from .query import Results
from .report import reason_filter
from .results import prob_column
from .reviews import CSV_COLUMNS, DECISIONS, NOT_ASSESSABLE, ReviewError

DISPLAY_SIZE = 320
"""Pixels of the square images on the page (the model's input, decoded at this size)."""
TEMPLATE = "review_page.html"
DATA_MARK = "/*__LEUKRAY_REVIEW_DATA__*/null"


def _select(res: Results, since: str | None, until: str | None, reason: str | None, limit: int | None,
            audit: int, seed: int, include_reviewed: bool) -> pa.Table:
    """The flagged rows (lowest confidence first), then `audit` random confident rows (seeded)."""
    try:
        reason_sql = f" AND {reason_filter(reason)}" if reason is not None else ""
    except ValueError as err:
        raise ReviewError(str(err)) from None
    conds, params = ["status = 'ok'"], []
    for op, value, name in ((">=", since, "--since"), ("<=", until, "--until")):
        if value:
            try:
                dt.date.fromisoformat(value)
            except ValueError:
                raise ReviewError(f"{name} {value!r} is not a date YYYY-MM-DD") from None
            conds.append(f"run_date {op} ?")
            params.append(value)
    if not include_reviewed:
        conds.append("reviewed_class IS NULL")
    probs = ", ".join(prob_column(c) for c in CLASSES)
    cols = (f"path, source_version, predicted_class, confidence, {probs}, review_reason, ood_check, ood_score, "
            f"run_date, run_id, model_name, model_version, CAST(scored_at AS VARCHAR) AS scored_at")
    where = " AND ".join(conds)
    flagged_where = where + " AND needs_review" + reason_sql
    sql = (f"SELECT {cols} FROM results WHERE {flagged_where} ORDER BY confidence ASC NULLS LAST, path, run_id"
           + (f" LIMIT {int(limit)}" if limit else ""))
    flagged = res.sql(sql, params + ([reason] if reason else []))
    if audit <= 0:
        return flagged
    audit_cols = cols.replace("review_reason", "'audit' AS review_reason")
    sample = res.sql(f"SELECT {audit_cols} FROM results "
                     f"WHERE {where} AND NOT needs_review ORDER BY hash(path || ?), path LIMIT {int(audit)}",
                     params + [str(seed)])
    return pa.concat_tables([flagged, sample.cast(flagged.schema)])


def _packages(res: Results, keys: set[tuple[str, str]], model_ref: str | None, opts: StorageOptions | None):
    """(model_name, model_version) → loaded package: `model_ref` (a package of that name and version, or a registry
    root holding <name>/<version>), else the package the runs that scored them recorded (`model_uri`)."""
    from .registry import load_package

    recorded = {(r.model_name, r.model_version): r.model_uri for r in res.runs if r.model_uri}
    out = {}
    for name, version in sorted(keys):
        candidates = []
        if model_ref:
            candidates = [model_ref, storage.join(model_ref, name, version)]
        elif (name, version) in recorded:
            candidates = [recorded[(name, version)]]
        pkg, tried = None, []
        for ref in candidates:
            try:
                p = load_package(ref, opts)
            except (LookupError, OSError, ValueError) as err:
                tried.append(f"{ref}: {err}")
                continue
            if (p.name, p.version) == (name, version):
                pkg = p
                break
            tried.append(f"{ref}: holds {p.name} {p.version}")
        if pkg is None:
            raise ReviewError(f"no model package for {name} {version} (heat maps need it): "
                              + ("; ".join(tried) if tried else "no run recorded its model_uri")
                              + "; pass --model PACKAGE_OR_REGISTRY, or --no-heatmaps")
        out[(name, version)] = pkg
    return out


def _jpeg(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=88)
    return buf.getvalue()


def build_page(output: str, html_dir: str, opts: StorageOptions | None = None, *, since: str | None = None,
               until: str | None = None, reason: str | None = None, limit: int | None = 200, audit: int = 0,
               seed: int = 0, include_reviewed: bool = False, model: str | None = None, heatmaps: bool = True,
               batch_size: int = 16, threads: int = 4) -> dict[str, Any]:
    """Write the review page for `output`'s needs-review rows into the local folder `html_dir`; returns what it
    wrote and how long the heat maps took per image."""
    t0 = time.perf_counter()
    with Results(output, opts) as res:
        rows = _select(res, since, until, reason, limit, audit, seed, include_reviewed).to_pylist()
        packages = _packages(res, {(r["model_name"], r["model_version"]) for r in rows}, model, opts) \
            if heatmaps and rows else {}
    img_dir = os.path.join(html_dir, "images")
    if os.path.isdir(img_dir):
        shutil.rmtree(img_dir)
    os.makedirs(img_dir)

    def read(path: str) -> bytes | str:
        try:
            return storage.read_bytes(path, opts)
        except (OSError, ValueError) as err:
            return f"cannot read: {err}"

    t_read = time.perf_counter()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        blobs = list(pool.map(read, [r["path"] for r in rows]))
    read_s = time.perf_counter() - t_read

    cards, cam_s, n_cam = [], 0.0, 0
    by_model: dict[tuple[str, str], list[int]] = {}
    display: dict[int, np.ndarray] = {}
    for i, (row, blob) in enumerate(zip(rows, blobs)):
        card = {"id": i, **{k: row[k] for k in ("path", "source_version", "predicted_class", "confidence",
                                                "review_reason", "ood_check", "ood_score", "run_date", "run_id",
                                                "model_name", "model_version", "scored_at")},
                "probs": [row[prob_column(c)] for c in CLASSES], "image": None, "heatmap": None, "problem": None}
        cards.append(card)
        if isinstance(blob, str):
            card["problem"] = blob
            continue
        try:
            display[i] = decode_image(blob, DISPLAY_SIZE)
        except ImageDecodeError as err:
            card["problem"] = f"cannot decode: {err}"
            continue
        card["image"] = f"images/{i:05d}.jpg"
        with open(os.path.join(html_dir, card["image"]), "wb") as f:
            f.write(_jpeg(display[i]))
        by_model.setdefault((row["model_name"], row["model_version"]), []).append(i)

    for key, idx in by_model.items() if heatmaps else ():
        from .heatmap import gradcam, overlay

        pkg = packages[key]
        size = pkg.image_size
        x = np.stack([decode_image(blobs[i], size) for i in idx])
        classes = [pkg.classes.index(rows[i]["predicted_class"]) for i in idx]
        t_cam = time.perf_counter()
        maps = gradcam(pkg.model, x, classes, batch_size=batch_size)
        cam_s += time.perf_counter() - t_cam
        n_cam += len(idx)
        for i, m in zip(idx, maps):
            cards[i]["heatmap"] = f"images/{i:05d}-cam.jpg"
            with open(os.path.join(html_dir, cards[i]["heatmap"]), "wb") as f:
                f.write(_jpeg(overlay(display[i], m)))

    built_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    page_id = hashlib.sha1(f"{output}|{built_at}|{len(cards)}".encode()).hexdigest()[:12]
    data = {"page_id": page_id, "output": output, "built_at": built_at, "classes": list(CLASSES),
            "decisions": list(DECISIONS), "not_assessable": NOT_ASSESSABLE, "csv_columns": CSV_COLUMNS,
            "cards": cards}
    page = resources.files("leukray").joinpath(TEMPLATE).read_text(encoding="utf-8")
    blob = json.dumps(data, default=str).replace("</", "<\\/")
    with open(os.path.join(html_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write(page.replace(DATA_MARK, blob))
    return {"html": os.path.join(html_dir, "index.html"), "page_id": page_id, "cards": len(cards),
            "flagged": sum(c["review_reason"] != "audit" for c in cards),
            "audit": sum(c["review_reason"] == "audit" for c in cards),
            "unreadable": sum(c["problem"] is not None for c in cards), "heatmaps": n_cam,
            "heatmap_s_per_image": round(cam_s / n_cam, 4) if n_cam else None,
            "read_s": round(read_s, 3), "total_s": round(time.perf_counter() - t0, 3)}


def export_labelled(output: str, dest: str, opts: StorageOptions | None = None) -> dict[str, Any]:
    """Copy every reviewed image (its latest decision) into `dest`/<class>/ (local or s3://); "not assessable"
    is left out and counted. A manifest `dest`/reviews.csv says where each file came from and who decided."""
    with Results(output, opts) as res:
        rows = res.sql("SELECT path, any_value(reviewed_class) AS reviewed_class, any_value(reviewed_by) AS "
                       "reviewed_by, CAST(any_value(reviewed_at) AS VARCHAR) AS reviewed_at FROM results "
                       "WHERE reviewed_class IS NOT NULL GROUP BY path ORDER BY path").to_pylist()
    counts = {c: 0 for c in CLASSES}
    skipped, missing, names = 0, [], set()
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(["file", "path", "reviewed_class", "reviewed_by", "reviewed_at"])
    for r in rows:
        if r["reviewed_class"] == NOT_ASSESSABLE:
            skipped += 1
            continue
        try:
            data = storage.read_bytes(r["path"], opts)
        except (OSError, ValueError):
            missing.append(r["path"])
            continue
        name = os.path.basename(r["path"].rstrip("/"))
        if (r["reviewed_class"], name) in names:  # same file name from another folder: keep both
            name = f"{hashlib.sha1(r['path'].encode()).hexdigest()[:8]}-{name}"
        names.add((r["reviewed_class"], name))
        rel = f"{r['reviewed_class']}/{name}"
        storage.write_bytes(storage.join(dest, r["reviewed_class"], name), data, opts)
        counts[r["reviewed_class"]] += 1
        writer.writerow([rel, r["path"], r["reviewed_class"], r["reviewed_by"], r["reviewed_at"]])
    storage.write_bytes(storage.join(dest, "reviews.csv"), manifest.getvalue().encode(), opts)
    return {"dest": dest, "images": sum(counts.values()), "per_class": counts, "not_assessable": skipped,
            "missing": len(missing), "missing_examples": missing[:5]}

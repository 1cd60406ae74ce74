#!/usr/bin/env python
"""The main job end to end on an embedded default: local Ray, local folders, generated smear images.

    python jobs/demo.py [--out runs/demo]

1. generate a labelled training set (leukray.synth)        → <out>/data
2. hyperparameter search: Ray Tune + Optuna, tiny space     → <out>/tune, winner published to <out>/registry
3. batch scoring: Ray Data over a generated "archive" with a few broken files, twice (the second run is
   incremental and adds nothing), then once more after new images arrive → <out>/scores (a Delta table)
4. query the outputs: summary, review queue, errors, runs  (DuckDB)
"""

import argparse
import os
import shutil
import sys
import time

from leukray.config import load_config
from leukray.query import Results
from leukray.report import format_table
from leukray.score import ScoreConfig, summary
from leukray.score import run as score
from leukray.search import load_search_config
from leukray.search import run as search
from leukray.synth import make_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_archive(root: str, seed: int, per_class: int, subdir: str) -> None:
    """Images as a lab archive holds them: nested folders, mixed-case extensions, and some broken files."""
    tmp = os.path.join(root, f".gen-{seed}")
    make_dataset(tmp, per_class=per_class, size=64, seed=seed)
    for i, (dirpath, _, files) in enumerate(sorted(os.walk(tmp))):
        for j, f in enumerate(sorted(files)):
            dst = os.path.join(root, subdir, f"slide-{i:02d}")
            os.makedirs(dst, exist_ok=True)
            name = f if j % 3 else f.replace(".jpg", ".JPG")
            shutil.move(os.path.join(dirpath, f), os.path.join(dst, name))
    shutil.rmtree(tmp)
    bad = os.path.join(root, subdir, "broken")
    os.makedirs(bad, exist_ok=True)
    open(os.path.join(bad, "empty.jpg"), "wb").close()
    with open(os.path.join(bad, "notes.png"), "w") as fh:
        fh.write("this is a text file with an image extension\n")
    with open(os.path.join(root, subdir, "slide-01", os.listdir(os.path.join(root, subdir, "slide-01"))[0]), "rb") as fh:
        head = fh.read(600)
    with open(os.path.join(bad, "truncated.jpg"), "wb") as fh:
        fh.write(head)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where everything is written (default runs/demo)")
    args = p.parse_args()
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(out)
    t0 = time.time()
    print(f"== 1/4 training data → {out}/data", flush=True)
    make_dataset(os.path.join(out, "data"), per_class=40, size=64, seed=0, duplicates=2)

    print("== 2/4 hyperparameter search (Ray Tune + Optuna TPE + ASHA)", flush=True)
    cfg = load_search_config(os.path.join(REPO, "configs", "tune-smoke.yaml"), {
        "train.data.root": os.path.join(out, "data"), "train.image_size": 64, "storage_path": os.path.join(out, "tune"),
        "name": "demo", "registry": os.path.join(out, "registry"), "model_name": "leukray-demo"})
    result = search(cfg)

    print("== 3/4 batch scoring (Ray Data) → the results Delta table", flush=True)
    archive = os.path.join(out, "archive")
    make_archive(archive, seed=10, per_class=15, subdir="2026-11-26")
    scfg = load_config(ScoreConfig, os.path.join(REPO, "configs", "score.yaml"), {
        "input": archive, "output": os.path.join(out, "scores"), "model": os.path.join(out, "registry", "leukray-demo")})
    first = score(scfg)
    print(summary(first), flush=True)
    again = score(scfg)
    print("second run (incremental, nothing new): " + summary(again), flush=True)
    make_archive(archive, seed=11, per_class=5, subdir="2026-11-27")
    third = score(scfg)
    print("after new images arrived: " + summary(third), flush=True)

    print("== 4/4 queries over the results (DuckDB)", flush=True)
    results = Results(os.path.join(out, "scores"))
    print("-- summary per run\n" + format_table(results.summary()))
    print("-- review queue (lowest confidence first)\n" + format_table(results.review(limit=5)))
    print("-- errors\n" + format_table(results.errors()))
    print("-- runs (the table's history)\n" + format_table(results.run_table().select(
        ["run_id", "status", "first_version", "last_version", "commits", "model", "seen", "scored", "skipped",
         "errors", "images_per_s"])))
    print(f"\nmodel package: {result['package']}\nscores: {out}/scores   ({time.time() - t0:.0f}s in all)")
    print(f"try: .venv/bin/leukray report summary --output {out}/scores")
    return 0


if __name__ == "__main__":
    sys.exit(main())

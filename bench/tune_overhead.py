#!/usr/bin/env python
"""What Ray Tune costs: the smoke search's wall time against the same trial configurations run one after another
with `train.fit` alone (no Ray), printed as JSON.

    python bench/tune_overhead.py [--config configs/tune-smoke.yaml] [--data DIR] [--set KEY=VALUE ...]

The search runs on a local Ray (127.0.0.1) in a temporary storage path and registry. The sequential baseline
prepares the data once and fits each trial's sampled configuration for the epochs that trial ran in the search
(ASHA may have stopped some early), so both sides do the same training work. Reported:
  search_wall_s      the whole search: data prep, Ray start, tuning, evaluate + publish the winner, outputs
  tune_wall_s        tuner.fit() alone
  sequential_fit_s   the baseline: every trial's fit, one after another, no Ray
  ratio_*            search (or tune) time / sequential time; < 1 means trials in parallel paid off
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tune-smoke.yaml")
    ap.add_argument("--data", help="labelled folder; default: a synthetic one (30 per class, 48 px) in a temp dir")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import yaml

    from leukray.search import load_search_config, run, trial_config
    from leukray.train import fit, prepare_data

    with tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp:
        data_root = args.data
        if not data_root:
            from leukray.synth import make_dataset

            data_root = str(make_dataset(os.path.join(tmp, "synth"), per_class=30, size=48, seed=0))
        overrides = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.set)}
        overrides.update({"train.data.root": data_root, "storage_path": os.path.join(tmp, "tune"),
                          "registry": os.path.join(tmp, "registry"), "name": "bench", "verbose": 0})
        cfg = load_search_config(args.config, overrides)

        t0 = time.time()
        summary = run(cfg)
        search_wall = time.time() - t0

        import ray

        ray.shutdown()
        trials = pq.read_table(summary["trials_table"]).to_pylist()
        base = cfg.local_paths_absolute().trial_base()
        data = prepare_data(base, os.path.join(tmp, "tune", "bench", "split.parquet"))
        per_trial, epochs_total = [], 0
        t1 = time.time()
        for row in trials:
            params = {name: row[f"param_{name}"] for name in cfg.space}
            tcfg = trial_config(base, params).model_copy(update={"epochs": max(1, int(row["epochs_run"]))})
            ts = time.time()
            fit(tcfg, data, verbose=False)
            per_trial.append(round(time.time() - ts, 2))
            epochs_total += tcfg.epochs
        sequential = time.time() - t1

    out = {
        "config": args.config, "trials": len(trials), "epochs_total": epochs_total,
        "max_concurrent_trials": cfg.max_concurrent_trials, "cpu_per_trial": cfg.resources.cpu,
        "cpus": os.cpu_count(),
        "search_wall_s": round(search_wall, 2), "tune_wall_s": summary["tune_wall_s"],
        "sequential_fit_s": round(sequential, 2), "sequential_per_trial_s": per_trial,
        "ratio_search_vs_sequential": round(search_wall / sequential, 2),
        "ratio_tune_vs_sequential": round(summary["tune_wall_s"] / sequential, 2),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hyperparameter search on Ray Tune (the only module that calls Tune): Optuna TPE (seeded) + ASHA, one
`leukray.train.fit` per trial, checkpoints every epoch, resumable, and the winner published as a versioned model.

Read top to bottom (the config, `SearchConfig`, is `leukray.search_config`): the trial (`trainable`: base
config + sampled hyperparameters → `train.fit`, reporting metrics and a checkpoint each epoch, resuming from
`tune.get_checkpoint()`) → the driver (`run`: split + decode cache once, Tuner or Tuner.restore, then the best
trial evaluated once on the test split and published, the trials table and Optuna plots written).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import tempfile
import time
import warnings
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import registry, storage
from .config import ConfigError, dump_config
from .raycluster import connect
from .search_config import ParamSpec, SearchConfig, kind, load_search_config, trial_config
from .train import FitResult, TrainConfig, evaluate_and_package, log, prepare_data

__all__ = ["SearchConfig", "load_search_config", "trial_config", "trainable", "run", "main", "run_from_args"]
STATE_FILE = "state.pt"
SEARCH_DIR = "search"
"""Sub-folder of the experiment folder with the search's own outputs (trials table, plots, summary)."""


# ------------------------------------------------------------------------------------------------ the trial
_DATA: dict[tuple, Any] = {}


def _worker_data(cfg: TrainConfig, manifest_uri: str):
    """PreparedData, once per worker process (actors are reused across trials); the images are the memory-mapped
    decode cache the driver built (a node without it builds its own)."""
    key = (cfg.data.root, cfg.data.limit_per_class, cfg.image_size, manifest_uri, cfg.split.model_dump_json())
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = prepare_data(cfg, manifest_uri)
    return _DATA[key]


def _load_state(directory: str) -> dict[str, Any]:
    import torch

    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def trainable(params: dict[str, Any], base: TrainConfig | None = None, manifest_uri: str | None = None) -> None:
    """One Tune trial: fit with the sampled params; report metrics + a checkpoint every epoch; resume from the
    trial's last checkpoint when Tune restores or retries it."""
    import torch
    from ray import tune

    from .train import fit

    cfg = trial_config(base, params)
    data = _worker_data(cfg, manifest_uri)
    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = _load_state(d)
        log(f"trial {tune.get_context().get_trial_id()}: resuming after epoch {resume['epoch']}")

    def on_epoch(row: dict[str, Any], checkpoint_fn) -> None:
        with tempfile.TemporaryDirectory() as d:
            torch.save(checkpoint_fn(), os.path.join(d, STATE_FILE))
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(d))

    fit(cfg, data, on_epoch=on_epoch, resume=resume)


# ------------------------------------------------------------------------------------------------ the driver
def _tune_space(space: dict[str, ParamSpec]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for name, s in space.items():
        if s.type == "uniform":
            out[name] = tune.uniform(s.low, s.high)
        elif s.type == "loguniform":
            out[name] = tune.loguniform(s.low, s.high)
        elif s.type == "int":
            out[name] = tune.randint(int(s.low), int(s.high) + 1)  # inclusive upper bound
        elif s.type == "logint":
            out[name] = tune.lograndint(int(s.low), int(s.high) + 1)
        else:
            out[name] = tune.choice(list(s.values))
    return out


def _optuna_distributions(space: dict[str, ParamSpec]) -> dict[str, Any]:
    import optuna

    d = optuna.distributions
    out: dict[str, Any] = {}
    for name, s in space.items():
        if s.type in ("uniform", "loguniform"):
            out[name] = d.FloatDistribution(s.low, s.high, log=s.type == "loguniform")
        elif s.type in ("int", "logint"):
            out[name] = d.IntDistribution(int(s.low), int(s.high), log=s.type == "logint")
        else:
            out[name] = d.CategoricalDistribution(list(s.values))
    return out


def _tune_storage(cfg: SearchConfig):
    """(storage_path for Tune, pyarrow filesystem, experiment path inside it)."""
    fs, path = storage.tune_filesystem(cfg.storage_path, cfg.storage)
    return path, fs, f"{path}/{cfg.name}"


def init_ray(num_cpus: int | None = None) -> None:
    # one checkpoint kept per trial forces a state snapshot per epoch: wanted (resume), not worth a warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    connect(num_cpus=num_cpus)


def _best_row(df, metric: str, mode: str):
    if df is None or len(df) == 0 or metric not in df:
        return None
    df = df[df[metric].notna()]
    if len(df) == 0:
        return None
    i = df[metric].idxmin() if mode == "min" else df[metric].idxmax()
    return df.loc[i]


def trials_table(grid, cfg: SearchConfig) -> list[dict[str, Any]]:
    """One row per trial: id, status, sampled params, epochs run, its best epoch's metrics, error if any."""
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        best = _best_row(df, cfg.metric, cfg.mode)
        trial_id = (r.metrics or {}).get("trial_id") or (
            str(df["trial_id"].iloc[-1]) if df is not None and "trial_id" in df and len(df) else os.path.basename(r.path))
        row: dict[str, Any] = {"trial_id": trial_id, "status": "error" if r.error else "ok",
                               "error": None if r.error is None else str(r.error).splitlines()[0][:500]}
        for name, s in cfg.space.items():
            v = (r.config or {}).get(name)
            row[f"param_{name}"] = None if v is None else (str(v) if s.type == "choice" and
                                                           kind(name) == "cat" else float(v))
        row["epochs_run"] = int(df["epoch"].max()) if df is not None and "epoch" in df and len(df) else 0
        for k in ("epoch", "val_loss", "val_accuracy", "val_macro_f1", "train_loss", "train_accuracy"):
            v = None if best is None else best.get(k)
            row[("best_epoch" if k == "epoch" else f"best_{k}")] = None if v is None or (
                isinstance(v, float) and math.isnan(v)) else (int(v) if k == "epoch" else float(v))
        row["time_total_s"] = float((r.metrics or {}).get("time_total_s") or 0.0)
        row["path"] = r.path
        rows.append(row)
    sign = 1 if cfg.mode == "min" else -1
    ranked = sorted((r for r in rows if r[f"best_{cfg.metric}"] is not None), key=lambda r: sign * r[f"best_{cfg.metric}"])
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    for r in rows:
        r.setdefault("rank", None)
    return rows


def optuna_plots(rows: list[dict[str, Any]], cfg: SearchConfig, out_dir: str) -> dict[str, str]:
    """Optimization history and parameter importances (PNG) from a study rebuilt out of the trials table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = _optuna_distributions(cfg.space)
    study = optuna.create_study(direction="minimize" if cfg.mode == "min" else "maximize",
                                study_name=cfg.name)
    for r in rows:
        value = r[f"best_{cfg.metric}"]
        if value is None:
            continue
        params = {}
        for name, s in cfg.space.items():
            v = r[f"param_{name}"]
            if s.type in ("int", "logint"):
                v = int(v)
            elif s.type == "choice":
                v = next((c for c in s.values if str(c) == str(v) or c == v), v)
            params[name] = v
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value,
                                                  user_attrs={"tune_trial_id": r["trial_id"]}))
    made: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(study.trials) >= 1:
            ax = ovm.plot_optimization_history(study, target_name=cfg.metric)
            path = os.path.join(out_dir, "optimization_history.png")
            ax.figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(ax.figure)
            made["optimization_history"] = path
        if len(study.trials) >= 2:
            try:
                ax = ovm.plot_param_importances(study, target_name=cfg.metric)
                path = os.path.join(out_dir, "param_importances.png")
                ax.figure.savefig(path, dpi=110, bbox_inches="tight")
                plt.close(ax.figure)
                made["param_importances"] = path
            except Exception as err:  # e.g. no parameter varied
                log(f"parameter importances skipped: {err}")
        else:
            log(f"parameter importances skipped: need at least 2 completed trials, have {len(study.trials)}")
    plt.close("all")
    return made


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        return _clean(v.item())
    return v


def run(cfg: SearchConfig) -> dict[str, Any]:
    """The whole search: prepare data once, tune (or resume), evaluate + publish the winner, write outputs."""
    t0 = time.time()
    cfg = cfg.local_paths_absolute()
    base = cfg.trial_base()
    exp_uri = storage.join(cfg.storage_path, cfg.name)
    summary_uri = storage.join(exp_uri, SEARCH_DIR, "summary.json")
    if storage.exists(summary_uri, cfg.storage):
        summary = storage.read_json(summary_uri, cfg.storage)
        log(f"experiment {exp_uri} already finished (published {summary.get('package')}); "
            f"choose another name to search again")
        print_summary(summary)
        return summary

    manifest_uri = base.split.manifest or storage.join(exp_uri, "split.parquet")
    data = prepare_data(base, manifest_uri)  # split manifest + decode cache, once, before any trial starts

    init_ray(cfg.num_cpus)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch
    import optuna

    trainable_fn = tune.with_resources(tune.with_parameters(trainable, base=base, manifest_uri=manifest_uri),
                                       {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    storage_path, fs, exp_path = _tune_storage(cfg)
    resumed = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if resumed:
        log(f"resuming the search in {exp_uri} (finished trials are kept, unfinished/errored ones continue "
            f"from their last checkpoint)")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable_fn, resume_errored=True, storage_filesystem=fs)
    else:
        searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.searcher.seed,
                                                                   n_startup_trials=cfg.searcher.n_startup_trials))
        epochs = base.epochs
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=cfg.scheduler.grace_period,
                                   reduction_factor=cfg.scheduler.reduction_factor)
                     if cfg.scheduler.type == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable_fn,
            param_space=_tune_space(cfg.space),
            tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, search_alg=searcher, scheduler=scheduler,
                                        num_samples=cfg.num_samples, max_concurrent_trials=cfg.max_concurrent_trials,
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=cfg.name, storage_path=storage_path, storage_filesystem=fs, verbose=cfg.verbose,
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    t_fit = time.time()
    grid = tuner.fit()
    tune_s = time.time() - t_fit

    rows = trials_table(grid, cfg)
    ok = [r for r in rows if r["rank"] is not None]
    if not ok:
        errors = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"])[:2000]
        raise RuntimeError(f"no trial reported {cfg.metric} ({len(rows)} trials; errors: {errors or 'none'})")
    best = grid.get_best_result(metric=cfg.metric, mode=cfg.mode, scope="all", filter_nan_and_inf=True)
    if best.checkpoint is None:
        raise RuntimeError(f"the best trial ({best.path}) has no checkpoint")
    with best.checkpoint.as_directory() as d:
        state = _load_state(d)
    best_row = next(r for r in rows if r["path"] == best.path)
    params = {k: _clean(v) for k, v in best.config.items() if k in cfg.space}
    log(f"best trial {best_row['trial_id']}: {cfg.metric} {best_row[f'best_{cfg.metric}']:.4f} at epoch "
        f"{state['best_epoch']}; params {params}")

    # the winner: best-epoch weights from its checkpoint, evaluated once on the untouched test split
    from .model import build_model

    win_cfg = trial_config(base, params)
    model = build_model(win_cfg.model.model_copy(update={"weights": "none"}), verbose=False)
    model.load_state_dict(state["best_state"])
    history = list(state["history"])
    result = FitResult(model=model.eval(), history=history, best_epoch=state["best_epoch"],
                       best=next((h for h in history if h["epoch"] == state["best_epoch"]), {}))

    search_out = storage.join(exp_uri, SEARCH_DIR)
    search_info = {
        "experiment": exp_uri, "resumed": resumed, "metric": cfg.metric, "mode": cfg.mode,
        "best_trial": {"trial_id": best_row["trial_id"], "params": params, "best_epoch": state["best_epoch"],
                       "epochs_run": best_row["epochs_run"], cfg.metric: best_row[f"best_{cfg.metric}"],
                       "val_loss": best_row["best_val_loss"], "val_accuracy": best_row["best_val_accuracy"],
                       "val_macro_f1": best_row["best_val_macro_f1"]},
        "num_trials": len(rows), "trials_ok": len(ok), "trials_errored": sum(r["status"] == "error" for r in rows),
        "searcher": f"optuna TPE (seed {cfg.searcher.seed})", "scheduler": cfg.scheduler.type,
        "trials_table": storage.join(search_out, "trials.parquet"),
        "search_config": dump_config(cfg),
    }
    with tempfile.TemporaryDirectory() as tmp:
        pkg = os.path.join(tmp, "package")
        card = evaluate_and_package(win_cfg, data, result, pkg, name=cfg.model_name, extra_card={"search": search_info})
        package_uri = registry.publish(pkg, cfg.registry, cfg.model_name, cfg.storage)
        out = os.path.join(tmp, "search")
        os.makedirs(out)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, "trials.parquet"))
        plots = optuna_plots(rows, cfg, out)
        val, test = card["metrics"]["val"], card["metrics"]["test"]
        summary = {
            "experiment": exp_uri, "resumed": resumed, "metric": cfg.metric,
            "best_trial": search_info["best_trial"],
            "val": {"accuracy": val["accuracy"], "macro_f1": val["macro"]["f1"]},
            "test": test and {"accuracy": test["accuracy"], "macro_f1": test["macro"]["f1"], "n": test["n"]},
            "temperature": card["temperature"], "package": package_uri,
            "trials": len(rows), "trials_ok": len(ok), "trials_table": search_info["trials_table"],
            "plots": {k: storage.join(search_out, os.path.basename(v)) for k, v in plots.items()},
            "split_manifest_hash": card["split_manifest_hash"],
            "tune_wall_s": round(tune_s, 2), "wall_s": round(time.time() - t0, 2),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        storage.write_json(os.path.join(out, "summary.json"), summary)
        storage.upload_dir(out, search_out, cfg.storage)
    print_summary(summary)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    b = s["best_trial"]
    lines = [
        "", "=" * 78, f"leukray search: {s['experiment']}" + ("  (resumed)" if s.get("resumed") else ""),
        f"  trials: {s['trials']} ({s['trials_ok']} with results)   metric: {s['metric']}",
        f"  best trial {b['trial_id']}: {s['metric']} {b[s['metric']]:.4f} (epoch {b['best_epoch']})",
        "  best params: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["params"].items()),
        f"  val:  accuracy {s['val']['accuracy']:.4f}  macro-F1 {s['val']['macro_f1']:.4f}",
        (f"  test: accuracy {s['test']['accuracy']:.4f}  macro-F1 {s['test']['macro_f1']:.4f}  (n={s['test']['n']})"
         if s.get("test") else "  test: (empty test split)"),
        f"  model package: {s['package']}",
        f"  trials table: {s['trials_table']}",
        f"  wall time: {s['wall_s']:.1f}s (tuning {s['tune_wall_s']:.1f}s)", "=" * 78,
    ]
    print("\n".join(lines), flush=True)
    print("SEARCH_SUMMARY " + json.dumps(s, default=str), flush=True)


# ------------------------------------------------------------------------------------------------ entry point
from .search_args import DEFAULT_CONFIG, SMOKE_CONFIG, add_arguments, overrides_from_args  # noqa: E402,F401


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    overrides = overrides_from_args(args)
    path = args.config or (SMOKE_CONFIG if args.smoke_test else DEFAULT_CONFIG)
    return load_search_config(path, overrides)


def main(argv: list[str] | None = None, prog: str = "jobs/tune.py") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Ray Tune hyperparameter search (Optuna TPE + ASHA); "
                                "the best trial is evaluated on the test split and published to the registry.")
    add_arguments(p)
    args = p.parse_args(argv)
    return run_from_args(args, prog)


def prepare_smoke(cfg: SearchConfig) -> None:
    """--smoke-test on a fresh clone: the tiny generated data set the smoke config trains on, made when absent."""
    root = cfg.train.data.root
    if root and not storage.is_remote(root) and not os.path.exists(root):
        from .synth import make_dataset

        log(f"smoke test: generating a tiny labelled data set in {root}")
        make_dataset(root, per_class=30, size=48, seed=0)


def run_from_args(args: argparse.Namespace, prog: str = "leukray tune") -> int:
    from .data import DataError

    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"{prog}: config error:\n{err}", file=sys.stderr)
        return 2
    try:
        if args.smoke_test:
            prepare_smoke(cfg)
        run(cfg)
    except (ConfigError, DataError, storage.StorageError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0

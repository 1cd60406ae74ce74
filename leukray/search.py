"""Hyperparameter search on Ray Tune (the only module that calls Tune): Optuna TPE (seeded) + ASHA, one
`leukray.train.fit` per trial, checkpoints every epoch, resumable, and the winner published as a versioned model.

Read top to bottom: the config (`SearchConfig`, every key validated at start) → the trial (`trainable`: base
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
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import Field, field_validator, model_validator

from . import registry, storage
from .augment import POLICIES
from .config import ConfigError, StorageOptions, StrictModel, dump_config, parse_config
from .raycluster import connect
from .train import FitResult, TrainConfig, evaluate_and_package, log, prepare_data

METRIC_MODES = {"val_loss": "min", "val_accuracy": "max", "val_macro_f1": "max"}
STATE_FILE = "state.pt"
SEARCH_DIR = "search"
"""Sub-folder of the experiment folder with the search's own outputs (trials table, plots, summary)."""


# ------------------------------------------------------------------------------------------------ the config
def _check_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"{v!r} is not a number"
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return f"{v!r} is below the allowed range {'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return f"{v!r} is above the allowed range {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        return None
    return check


def _check_in(allowed: tuple) -> Any:
    def check(v: Any) -> str | None:
        return None if v in allowed else f"{v!r} is not one of {', '.join(map(str, allowed))}"
    return check


# name → (dotted TrainConfig key, value kind, value check)
HYPERPARAMETERS: dict[str, tuple[str, str, Any]] = {
    "lr": ("lr", "float", _check_range(0.0, 1.0, lo_open=True)),
    "weight_decay": ("weight_decay", "float", _check_range(0.0, 1.0)),
    "dropout": ("model.dropout", "float", _check_range(0.0, 1.0, hi_open=True)),
    "label_smoothing": ("label_smoothing", "float", _check_range(0.0, 1.0, hi_open=True)),
    "augment_strength": ("augment_strength", "float", _check_range(0.0, 4.0)),
    "augment_zoom": ("augment_zoom", "float", _check_range(1.0, 4.0)),
    "augment_p": ("augment_p", "float", _check_range(0.0, 1.0)),
    "ema_decay": ("ema_decay", "float", _check_range(0.0, 1.0, hi_open=True)),
    "warmup_epochs": ("warmup_epochs", "float", _check_range(0.0, 100.0)),
    "head_width": ("model.head_width", "int", _check_range(0, 4096)),
    "batch_size": ("batch_size", "int", _check_range(1, 4096)),
    "augment": ("augment", "cat", _check_in(POLICIES)),
    "optimizer": ("optimizer", "cat", _check_in(("adam", "adamw"))),
    "schedule": ("schedule", "cat", _check_in(("cosine", "constant"))),
}
DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")


class ParamSpec(StrictModel):
    """One search-space entry: `{type: loguniform, low: 1e-4, high: 3e-3}` or `{type: choice, values: [...]}`."""

    type: Literal["uniform", "loguniform", "int", "logint", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> "ParamSpec":
        if self.type == "choice":
            if not self.values:
                raise ValueError("type 'choice' needs a non-empty 'values' list")
            if self.low is not None or self.high is not None:
                raise ValueError("type 'choice' takes 'values', not 'low'/'high'")
            return self
        if self.values is not None:
            raise ValueError(f"type {self.type!r} takes 'low' and 'high', not 'values'")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type!r} needs both 'low' and 'high'")
        if self.low > self.high or (self.type in ("uniform", "loguniform") and self.low == self.high):
            raise ValueError(f"low={self.low} must be below high={self.high}")
        if self.type in ("loguniform", "logint") and self.low <= 0:
            raise ValueError(f"type {self.type!r} needs low > 0 (got {self.low})")
        if self.type in ("int", "logint") and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"type {self.type!r} needs integer bounds (got {self.low}, {self.high})")
        return self

    def extremes(self) -> list[Any]:
        if self.type == "choice":
            return list(self.values or [])
        if self.type in ("int", "logint"):
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class SearcherConfig(StrictModel):
    type: Literal["optuna"] = "optuna"
    """Optuna TPE sampler (the only searcher)."""
    seed: int = 0
    n_startup_trials: int = Field(4, ge=0)
    """Random trials before TPE starts modelling."""


class SchedulerConfig(StrictModel):
    type: Literal["asha", "fifo"] = "asha"
    """`asha` stops poor trials early (by `metric` at each epoch); `fifo` runs every trial to the end."""
    grace_period: int = Field(1, ge=1)
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: float = Field(2.0, gt=1.0)


class ResourcesConfig(StrictModel):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    """Fractional values let several small trials share one GPU (e.g. 0.25 = four trials per GPU)."""

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("more than one GPU per trial must be a whole number")
        return v


class SearchConfig(StrictModel):
    base_config: str | None = None
    """A `leukray train` YAML (e.g. configs/train.yaml); `train:` below overrides its keys."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The base training config every trial starts from (the sampled hyperparameters replace its keys)."""
    space: dict[str, ParamSpec]
    """Hyperparameter → distribution. Names: see HYPERPARAMETERS."""
    metric: Literal["val_loss", "val_accuracy", "val_macro_f1"] = "val_loss"
    """What the searcher, ASHA and the best-trial pick optimise (also each trial's early-stopping monitor)."""
    searcher: SearcherConfig = Field(default_factory=SearcherConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    num_samples: int = Field(16, ge=1)
    max_concurrent_trials: int | None = Field(4, ge=1)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    epochs: int | None = Field(None, ge=1)
    """Epochs per trial (ASHA's max_t); default: train.epochs."""
    storage_path: str = "runs/tune"
    """Where Tune keeps the experiment (local folder or s3://bucket/prefix); the experiment is <storage_path>/<name>."""
    name: str = "leukray-tune"
    registry: str = "runs/registry"
    model_name: str = "leukray-mobilenetv2"
    max_failures: int = Field(2, ge=-1)
    """Retries of a failed trial (from its last checkpoint); -1 = unlimited."""
    verbose: int = Field(2, ge=0, le=3)
    """Tune's console output: 0 silent, 1 results, 2 trial status table + results."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of the local Ray started when no cluster is given (RAY_ADDRESS unset); default: all."""
    storage: StorageOptions = Field(default_factory=StorageOptions)
    """Object-storage options for storage_path, registry and data (endpoint; credentials from the environment)."""

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not space:
            raise ValueError(f"the search space is empty; search at least one of {', '.join(HYPERPARAMETERS)}")
        for name, spec in space.items():
            if name not in HYPERPARAMETERS:
                raise ValueError(f"unknown hyperparameter {name!r}; allowed: {', '.join(HYPERPARAMETERS)}")
            _key, kind, check = HYPERPARAMETERS[name]
            if kind == "cat" and spec.type != "choice":
                raise ValueError(f"{name}: a categorical hyperparameter needs type 'choice', not {spec.type!r}")
            if kind == "int" and spec.type in ("uniform", "loguniform"):
                raise ValueError(f"{name}: an integer hyperparameter needs type 'int', 'logint' or 'choice', "
                                 f"not {spec.type!r}")
            if kind == "float" and spec.type in ("int", "logint"):
                raise ValueError(f"{name}: a real-valued hyperparameter needs type 'uniform', 'loguniform' or "
                                 f"'choice', not {spec.type!r}")
            for v in spec.extremes():
                if kind == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                    problem = f"{v!r} is not an integer"
                else:
                    problem = check(v)
                if problem:
                    raise ValueError(f"{name}: {problem}")
        return space

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it becomes a folder name)")
        return v

    @field_validator("storage_path", "registry")
    @classmethod
    def _uri(cls, v: str) -> str:
        if "://" in v and not v.startswith(("s3://", "s3a://", "file://")):
            raise ValueError("use a local path or s3://bucket/prefix")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "SearchConfig":
        epochs = self.epochs or self.train.epochs
        if self.scheduler.type == "asha" and self.scheduler.grace_period > epochs:
            raise ValueError(f"scheduler.grace_period={self.scheduler.grace_period} exceeds epochs={epochs}")
        if self.searcher.n_startup_trials > self.num_samples:
            pass  # fine: all trials are then random
        return self

    @property
    def mode(self) -> str:
        return METRIC_MODES[self.metric]

    def trial_base(self) -> TrainConfig:
        """The base TrainConfig every trial starts from: epochs, monitor and storage set by the search."""
        data = self.train.model_dump()
        data["epochs"] = self.epochs or self.train.epochs
        data["monitor"] = self.metric
        if self.train.storage == StorageOptions():
            data["storage"] = self.storage.model_dump()
        if self.train.num_threads is None and self.resources.gpu == 0:
            data["num_threads"] = max(1, int(self.resources.cpu))
        return TrainConfig.model_validate(data)

    def local_paths_absolute(self) -> "SearchConfig":
        """Local storage_path/registry/data.root as absolute paths (Tune needs them; job working dirs move)."""
        upd: dict[str, Any] = {}
        for key in ("storage_path", "registry"):
            v = getattr(self, key)
            if not storage.is_remote(v):
                upd[key] = os.path.abspath(os.path.expanduser(v[len("file://"):] if v.startswith("file://") else v))
        out = self.model_copy(update=upd)
        root = out.train.data.root
        if root and not storage.is_remote(root):
            out.train.data.root = os.path.abspath(os.path.expanduser(root))
        return out


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_search_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> SearchConfig:
    """YAML → SearchConfig: `base_config` (a train YAML) merged under `train:`, dotted `overrides` applied, every
    key validated (the error names the file and key)."""
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"override {dotted}: {p!r} is not a mapping")
            node = node.setdefault(p, {})
        node[leaf] = value
    base = data.get("base_config")
    if base:
        cands = ([Path(path).parent / base] if path else []) + [Path(base)]  # beside the search config, else cwd
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{source}: key 'base_config' = {base!r}: file not found")
        try:
            base_data = yaml.safe_load(found.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{found}: not valid YAML: {err}") from None
        if not isinstance(base_data, dict):
            raise ConfigError(f"{found}: expected a mapping at the top level")
        train = data.get("train") or {}
        if not isinstance(train, dict):
            raise ConfigError(f"{source}: key 'train' must be a mapping")
        data["train"] = _deep_merge(base_data, train)
    return parse_config(SearchConfig, data, source)


# ------------------------------------------------------------------------------------------------ the trial
def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def trial_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The trial's TrainConfig: base with the sampled hyperparameters put at their keys."""
    data = base.model_dump()
    for name, value in params.items():
        if name not in HYPERPARAMETERS:
            raise ConfigError(f"trial parameter {name!r} is not a known hyperparameter")
        key, kind, _ = HYPERPARAMETERS[name]
        if kind == "int":
            value = int(value)
        elif kind == "float":
            value = float(value)
        _set_dotted(data, key, value)
    return TrainConfig.model_validate(data)


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
    """(storage_path for Tune, pyarrow filesystem or None, experiment path inside it)."""
    if storage.is_remote(cfg.storage_path):
        import s3fs
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs = PyFileSystem(FSSpecHandler(s3fs.S3FileSystem(**storage.s3_kwargs(cfg.storage))))
        path = cfg.storage_path.split("://", 1)[1].rstrip("/")
        return path, fs, f"{path}/{cfg.name}"
    return cfg.storage_path, None, os.path.join(cfg.storage_path, cfg.name)


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
                                                           HYPERPARAMETERS[name][1] == "cat" else float(v))
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


def run_from_args(args: argparse.Namespace, prog: str = "leukray tune") -> int:
    from .data import DataError

    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"{prog}: config error:\n{err}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except (ConfigError, DataError, storage.StorageError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0

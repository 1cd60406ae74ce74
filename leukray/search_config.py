"""The search's configuration: `SearchConfig` (a tune YAML, every key validated at start) and the hyperparameters
a search may sample, each a key of the training config.

A search-space entry is checked against the training config itself: its distribution must fit the key's type
(a choice for a categorical key, integers for an integer key) and both ends of its range (every value of a choice)
must pass `TrainConfig`'s own field limits, so the search never samples a value a training run would refuse.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from . import storage
from .config import ConfigError, StorageOptions, StrictModel, apply_overrides, parse_config, read_yaml
from .train import TrainConfig

METRIC_MODES = {"val_loss": "min", "val_accuracy": "max", "val_macro_f1": "max"}

HYPERPARAMETERS: dict[str, str] = {
    "lr": "lr",
    "weight_decay": "weight_decay",
    "dropout": "model.dropout",
    "label_smoothing": "label_smoothing",
    "augment_strength": "augment_strength",
    "augment_zoom": "augment_zoom",
    "augment_p": "augment_p",
    "consistency": "consistency",
    "consistency_ce": "consistency_ce",
    "consistency_ce_copy": "consistency_ce_copy",
    "ema_decay": "ema_decay",
    "warmup_epochs": "warmup_epochs",
    "head_width": "model.head_width",
    "batch_size": "batch_size",
    "augment": "augment",
    "optimizer": "optimizer",
    "schedule": "schedule",
}
"""Hyperparameter name → the dotted TrainConfig key it sets."""
DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")


def kind(name: str) -> str:
    """'float', 'int' or 'cat': the type of the TrainConfig field a hyperparameter sets."""
    model: Any = TrainConfig
    *parents, leaf = HYPERPARAMETERS[name].split(".")
    for p in parents:
        model = model.model_fields[p].annotation
    annotation = model.model_fields[leaf].annotation
    return {float: "float", int: "int"}.get(annotation, "cat")


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def trial_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The trial's TrainConfig: base with the sampled hyperparameters put at their keys."""
    data = base.model_dump()
    for name, value in params.items():
        if name not in HYPERPARAMETERS:
            raise ConfigError(f"trial parameter {name!r} is not a known hyperparameter")
        value = {"int": int, "float": float}.get(kind(name), lambda v: v)(value)
        set_dotted(data, HYPERPARAMETERS[name], value)
    return TrainConfig.model_validate(data)


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


def check_param(name: str, spec: ParamSpec, base: TrainConfig | None) -> None:
    """A search-space entry fits the TrainConfig key it sets: its distribution the key's type, its ends (every
    choice) the key's limits. The error names the hyperparameter, the value and the key's rule."""
    if name not in HYPERPARAMETERS:
        raise ValueError(f"unknown hyperparameter {name!r}; allowed: {', '.join(HYPERPARAMETERS)}")
    k, key = kind(name), HYPERPARAMETERS[name]
    if k == "cat" and spec.type != "choice":
        raise ValueError(f"{name}: a categorical hyperparameter needs type 'choice', not {spec.type!r}")
    if k == "int" and spec.type in ("uniform", "loguniform"):
        raise ValueError(f"{name}: an integer hyperparameter needs type 'int', 'logint' or 'choice', not {spec.type!r}")
    if k == "float" and spec.type in ("int", "logint"):
        raise ValueError(f"{name}: a real-valued hyperparameter needs type 'uniform', 'loguniform' or 'choice', "
                         f"not {spec.type!r}")
    if base is None:
        return
    for value in spec.extremes():
        if k == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name}: {value!r} is not an integer")
        try:
            trial_config(base, {name: value})
        except ValidationError as err:
            e = next((e for e in err.errors() if ".".join(map(str, e["loc"])) == key), err.errors()[0])
            raise ValueError(f"{name}: {value!r} is not a valid train.{key}: {e['msg']}") from None
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name}: {value!r} is not a valid train.{key}: {err}") from None


class SearchConfig(StrictModel):
    base_config: str | None = None
    """A `leukray train` YAML (e.g. configs/train.yaml); `train:` below overrides its keys."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The base training config every trial starts from (the sampled hyperparameters replace its keys)."""
    space: dict[str, ParamSpec]
    """Hyperparameter → distribution. Names: lr, weight_decay, dropout (sets model.dropout), label_smoothing,
    augment_strength, augment_zoom, augment_p, consistency, consistency_ce, consistency_ce_copy, ema_decay,
    warmup_epochs, head_width (model.head_width), batch_size, augment, optimizer, schedule; each value must be valid
    for the training key it sets (its limits above)."""
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
    def _space(cls, space: dict[str, ParamSpec], info: ValidationInfo) -> dict[str, ParamSpec]:
        if not space:
            raise ValueError(f"the search space is empty; search at least one of {', '.join(HYPERPARAMETERS)}")
        base = info.data.get("train")  # absent when `train:` itself is invalid (that error is reported)
        for name, spec in space.items():
            check_param(name, spec, base)
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
    data = apply_overrides(read_yaml(path) if path else {}, overrides)
    base = data.get("base_config")
    if base:
        cands = ([Path(path).parent / base] if path else []) + [Path(base)]  # beside the search config, else cwd
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{source}: key 'base_config' = {base!r}: file not found")
        train = data.get("train") or {}
        if not isinstance(train, dict):
            raise ConfigError(f"{source}: key 'train' must be a mapping")
        data["train"] = _deep_merge(read_yaml(found), train)
    return parse_config(SearchConfig, data, source, overrides)

"""YAML configuration → typed, validated objects.

Every config class derives from `StrictModel`, so a misspelt key fails at start with its name and the file
instead of being silently ignored hours into a run.
"""

from __future__ import annotations

import difflib
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

T = TypeVar("T", bound="StrictModel")


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message names the file and key."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class StorageOptions(StrictModel):
    """How to reach object storage. Credentials are read from the environment (AWS_ACCESS_KEY_ID, …) unless given
    here; they are never written to logs or outputs."""

    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, moto …). Default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS."""
    region: str | None = None
    key: SecretStr | None = None
    secret: SecretStr | None = None
    anon: bool = False


def _fields_at(cls: type[BaseModel], parents: tuple[Any, ...]) -> list[str]:
    """The key names allowed under `parents` (a pydantic error location), or [] where the path is not models."""
    model: Any = cls
    for part in parents:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        nested = [t for t in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def format_validation_error(err: ValidationError, source: str, cls: type[BaseModel] | None = None,
                            overrides: dict[str, Any] | None = None) -> str:
    """One line per error, naming where the key came from: `source`, or `--set KEY` when an override set it. An
    unknown key gets the nearest allowed one (a typo is the usual cause)."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        where = next((f"--set {o}" for o in overrides or {} if key == o or key.startswith(o + ".")), source)
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _fields_at(cls, e["loc"][:-1]) if cls else [], n=1)
            hint = f" (did you mean '{'.'.join([*map(str, e['loc'][:-1]), close[0]])}'?)" if close else ""
            lines.append(f"{where}: unknown key '{key}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"{where}: missing required key '{key}'")
        else:
            value = e.get("input")
            lines.append(f"{where}: key '{key}' = {value!r}: {e['msg']}")
    return "\n".join(lines)


def parse_config(cls: type[T], data: dict[str, Any] | None, source: str = "<config>",
                 overrides: dict[str, Any] | None = None) -> T:
    """Validate a mapping against `cls`, turning pydantic's errors into one message naming source (or the `--set`
    override) and keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, cls, overrides)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (empty file = {}); errors name the file. The one YAML reader of the configs."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs → {dotted key: value}; the value is read as YAML (`2` an int, `[a, b]` a list)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE (e.g. --set epochs=2)")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML: {err}") from None
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set each dotted key of `overrides` in `data` (in place; parents created)."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(node.setdefault(p, {}), dict):
                raise ConfigError(f"override {dotted}: {p!r} is not a mapping")
            node = node[p]
        node[leaf] = value
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None) -> T:
    """Load YAML at `path` (or defaults when None), apply dotted-key `overrides`, validate as `cls`."""
    data = read_yaml(path) if path is not None else {}
    return parse_config(cls, apply_overrides(data, overrides), str(path) if path is not None else "<defaults>",
                        overrides)


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (secrets masked), saved beside every artefact."""
    return json.loads(cfg.model_dump_json())

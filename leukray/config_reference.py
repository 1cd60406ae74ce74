"""The reference of every key of the train, tune and score YAML files, made from the config classes themselves
(their types, defaults, limits and docstrings), so it cannot drift from what is validated:

    python -m leukray.config_reference > docs/configuration.md
"""

from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HEADER = """# Configuration reference

Every key of the YAML files `leukray train --config`, `jobs/tune.py --config` / `leukray tune --config` and
`jobs/score.py --config` / `leukray score --config` read; any other key is an error that names it. A key can also be
set on the command line with `--set dotted.key=VALUE` (the value is read as YAML). This page is generated from the
config classes (`python -m leukray.config_reference > docs/configuration.md`); a test checks it is current.
"""

SECTIONS = (
    ("Training (`configs/train.yaml`)", "leukray.train", "TrainConfig",
     "A training run: data, split, model, recipe, calibration, the out-of-distribution guard."),
    ("Search (`configs/tune.yaml`)", "leukray.search_config", "SearchConfig",
     "A Ray Tune search. `train:` holds training keys (the table above), merged over `base_config`; each `space` "
     "entry names a hyperparameter and must fit the training key it sets."),
    ("Scoring (`configs/score.yaml`)", "leukray.score", "ScoreConfig",
     "A batch-scoring run with Ray Data into the results Delta table."),
)


def _type(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
    text = text or str(annotation)
    text = re.sub(r"\btuple\[(\w+), \.\.\.\]", r"list[\1]", text)  # a list in YAML
    return re.sub(r"\b(typing|pydantic\.types|leukray\.\w+)\.", "", text).replace("NoneType", "None").replace("|", "\\|")


def _limits(field: Any) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    return ", ".join(f"{signs[k]} {getattr(m, k)}" for m in field.metadata for k in signs if hasattr(m, k))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else ""
    if field.default is None:
        return "none"
    if isinstance(field.default, tuple):
        return f"`[{', '.join(map(str, field.default))}]`"
    return f"`{str(field.default).lower() if isinstance(field.default, bool) else field.default}`"


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the config class a key holds, whether it is a mapping of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is dict:
        value = typing.get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value, True
    return None, False


def rows(cls: type[BaseModel], prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """(key, type, default, limits, description) of every key of `cls`, nested sections as dotted keys."""
    out = []
    for name, field in cls.model_fields.items():
        key = prefix + name
        doc = " ".join((field.description or "").split()).replace("|", "\\|")
        model, mapping = _model_of(field.annotation)
        if key in skip:
            out.append((key, "section", "", "", doc))
        elif model is not None:
            out.append((key, "mapping of sections" if mapping else "section", "", "", doc))
            out += rows(model, key + (".<name>." if mapping else "."))
        else:
            out.append((key, _type(field.annotation), _default(field), _limits(field), doc))
    return out


def reference() -> str:
    import importlib

    parts = [HEADER]
    for title, module, name, intro in SECTIONS:
        cls = getattr(importlib.import_module(module), name)
        parts += [f"## {title}", "", intro, "", "| key | type | default | limits | meaning |", "|---|---|---|---|---|"]
        parts += ["| " + " | ".join([f"`{r[0]}`", *r[1:]]) + " |" for r in rows(cls, skip=("train",))]
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference(), end="")

"""Command-line arguments of the search (`jobs/tune.py`, `leukray tune`), kept free of heavy imports so that
building the `leukray` parser stays fast; the search itself is `leukray.search`."""

from __future__ import annotations

import argparse
from typing import Any

SMOKE_CONFIG = "configs/tune-smoke.yaml"
DEFAULT_CONFIG = "configs/tune.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"search YAML (default {DEFAULT_CONFIG}; {SMOKE_CONFIG} with --smoke-test)")
    p.add_argument("--smoke-test", action="store_true", help=f"the tiny search ({SMOKE_CONFIG}) for tests/CI")
    p.add_argument("--data", help="labelled image folder, local or s3:// (overrides train.data.root)")
    p.add_argument("--storage-path", help="experiment storage, local or s3:// (overrides storage_path)")
    p.add_argument("--registry", help="model registry, local or s3:// (overrides registry)")
    p.add_argument("--name", help="experiment name (overrides name); rerun with the same name to resume")
    p.add_argument("--num-samples", type=int, help="number of trials (overrides num_samples)")
    p.add_argument("--epochs", type=int, help="epochs per trial (overrides epochs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted, e.g. --set resources.gpu=0.5)")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from .config import parse_overrides

    overrides = parse_overrides(args.set)
    for flag, key in (("data", "train.data.root"), ("storage_path", "storage_path"), ("registry", "registry"),
                      ("name", "name"), ("num_samples", "num_samples"), ("epochs", "epochs")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    return overrides

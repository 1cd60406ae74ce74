"""`leukray` command line: thin wrappers over the library (each subcommand parses, then calls one function)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .config import ConfigError, load_config


def _overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"--set {p!r}: expected KEY=VALUE (e.g. --set epochs=2)")
        k, v = p.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    overrides = _overrides(args.set)
    if args.data:
        overrides["data.root"] = args.data
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    cfg = load_config(TrainConfig, args.config, overrides)
    card = train(cfg, args.out)
    print(json.dumps({"out": args.out, "test": card["metrics"]["test"] and {
        k: card["metrics"]["test"][k] for k in ("accuracy", "macro", "n")}}, indent=2))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import make_dataset

    out = make_dataset(args.out, per_class=args.per_class, size=args.size, seed=args.seed, duplicates=args.duplicates)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leukray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune MobileNetV2 on a labelled folder, evaluate, write a model package")
    t.add_argument("--data", help="labelled image folder, local or s3:// (overrides data.root)")
    t.add_argument("--out", required=True, help="output folder or s3:// URI (model package, metrics, plots)")
    t.add_argument("--config", help="YAML config (see configs/train.yaml)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("synth", help="generate a synthetic labelled smear dataset (demo and tests)")
    s.add_argument("--out", required=True)
    s.add_argument("--per-class", type=int, default=60)
    s.add_argument("--size", type=int, default=96)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--duplicates", type=int, default=0)
    s.set_defaults(func=cmd_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, LookupError, OSError) as err:
        print(f"leukray {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

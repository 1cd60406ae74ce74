#!/usr/bin/env python
"""Batch scoring entry point (thin): parse, load config, call leukray.score.run, print the summary.

    python jobs/score.py --config configs/score.yaml [--input URI] [--output URI] [--model REF]
    ray job submit --working-dir . -- python jobs/score.py --config configs/score.yaml
    python jobs/score.py --smoke-test          # configs/score-smoke.yaml, creates a tiny archive + model
    python jobs/score.py --config configs/score.yaml --vacuum           # delete old uncommitted files only
    python jobs/score.py --convert-legacy s3://lab-scores/score         # previous layout → Delta table, once
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from leukray.config import ConfigError, load_config, parse_overrides
from leukray.smoke import prepare_smoke

SMOKE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "score-smoke.yaml")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (configs/score.yaml)")
    p.add_argument("--input", help="archive prefix, local or s3://bucket/prefix")
    p.add_argument("--output", help="the results Delta table, local or s3://")
    p.add_argument("--model", help="registry reference: package folder or model folder (LATEST)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted)")
    p.add_argument("--smoke-test", action="store_true", help="tiny local run (configs/score-smoke.yaml)")
    p.add_argument("--vacuum", action="store_true", help="only delete uncommitted files older than the retention")
    p.add_argument("--convert-legacy", metavar="OUTPUT", help="only convert OUTPUT (previous layout) to the table")
    args = p.parse_args(argv)

    from leukray import score

    try:
        overrides = parse_overrides(args.set)
        overrides.update({k: v for k, v in (("input", args.input), ("output", args.output), ("model", args.model))
                          if v})
        cfg = load_config(score.ScoreConfig, args.config or (SMOKE_CONFIG if args.smoke_test else None), overrides)
        if args.convert_legacy:
            print(json.dumps(score.convert_legacy(args.convert_legacy, cfg), indent=2))
            return 0
        if args.vacuum:
            print(json.dumps({"output": cfg.output, "removed": score.vacuum(cfg)}, indent=2))
            return 0
        if args.smoke_test:
            prepare_smoke(cfg)
        record = score.run(cfg)
    except (ConfigError, score.ScoreError, LookupError, OSError, ValueError) as err:
        print(f"score: error: {err}", file=sys.stderr)
        return 2
    print(score.summary(record))
    print(score.main_summary_json(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

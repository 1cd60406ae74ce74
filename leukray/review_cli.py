"""`leukray review {build,import,export-labelled}`: argparse wiring for `leukray.review` and `leukray.reviews`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .config import StorageOptions
from .report import REASONS


def _opts(args: argparse.Namespace) -> StorageOptions | None:
    return StorageOptions(endpoint_url=args.endpoint_url) if args.endpoint_url else None


def cmd_build(args: argparse.Namespace) -> int:
    from .review import build_page

    out = build_page(args.output, args.html, _opts(args), since=args.since, until=args.until, reason=args.reason,
                     limit=args.limit or None, audit=args.audit, seed=args.seed, include_reviewed=args.all,
                     model=args.model, heatmaps=not args.no_heatmaps, batch_size=args.batch_size)
    print(json.dumps(out, indent=2))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .reviews import import_decisions

    print(json.dumps(import_decisions(args.decisions, args.output, _opts(args)), indent=2))
    return 0


def cmd_export_labelled(args: argparse.Namespace) -> int:
    from .review import export_labelled

    print(json.dumps(export_labelled(args.output, args.dest, _opts(args)), indent=2))
    return 0


def add_review_commands(subparsers: Any) -> None:
    """Register `review build|import|export-labelled` on the `leukray` subparsers."""
    rv = subparsers.add_parser("review", help="review page for flagged images, import decisions, labelled export",
                               description="The needs-review queue as a page (heat maps, keys, decisions), the "
                                           "decisions back into a reviews table, the reviewed images as a "
                                           "labelled folder.")
    sub = rv.add_subparsers(dest="review", metavar="{build,import,export-labelled}", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", "-o", required=True, metavar="URI",
                        help="the scoring results table, local folder or s3://bucket/prefix")
    common.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint (default $AWS_ENDPOINT_URL)")

    b = sub.add_parser("build", parents=[common], help="write the static review page (index.html + images)")
    b.add_argument("--html", required=True, metavar="DIR", help="local folder for index.html and its images")
    b.add_argument("--since", metavar="YYYY-MM-DD", help="first run_date to include")
    b.add_argument("--until", metavar="YYYY-MM-DD", help="last run_date to include")
    b.add_argument("--reason", choices=REASONS,
                   help="only rows flagged for this reason, or by this check of the guard "
                        "(knn, optics, colour, structure)")
    b.add_argument("--limit", type=int, default=200, help="at most this many flagged rows, lowest confidence first "
                                                          "(default 200; 0 = all)")
    b.add_argument("--audit", type=int, default=0, metavar="N",
                   help="also N random confident (not flagged) rows, to audit what the model does not flag")
    b.add_argument("--seed", type=int, default=0, help="seed of the audit sample")
    b.add_argument("--all", action="store_true", help="also rows a reviewer has already decided")
    b.add_argument("--model", metavar="REF", help="package, or registry root holding <name>/<version>, for the heat "
                                                  "maps (default: the package each run recorded)")
    b.add_argument("--no-heatmaps", action="store_true", help="no Grad-CAM overlays (no model needed)")
    b.add_argument("--batch-size", type=int, default=16, help="images per Grad-CAM batch")
    b.set_defaults(func=cmd_build)

    i = sub.add_parser("import", parents=[common], help="append a decisions CSV (the page's export) to the "
                                                        "reviews table")
    i.add_argument("decisions", help="decisions CSV, local or s3://")
    i.set_defaults(func=cmd_import)

    e = sub.add_parser("export-labelled", parents=[common],
                       help="copy the reviewed images into DEST/<class>/ (for calibrate or train --data)")
    e.add_argument("--dest", required=True, help="destination folder, local or s3://")
    e.set_defaults(func=cmd_export_labelled)

"""`leukray query` and `leukray report ...`: argparse wiring for `leukray.query`.

`leukray/cli.py` calls `add_query_commands(subparsers)`; every leaf command sets `func` on the namespace, called as
`args.func(args)` and returning the process exit code (0 ok; 1 when `report drift --alert` names a day, its
`alert:` lines on stderr; 2 for a query/storage error, printed to stderr as `error: ...`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NamedTuple, Sequence, TextIO

from .config import StorageOptions
from .drift import ALERT_ALPHA, ALERT_MIN_SHIFT
from .report import REASONS

DEFAULT_OUTPUT = "runs/score"
FORMATS = ("table", "csv", "json")

__all__ = ["add_query_commands", "build_parser", "main", "DEFAULT_OUTPUT"]


def _common(since_until: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--output", "-o", metavar="URI", default=None,
                   help="scoring output prefix, local folder or s3://bucket/prefix "
                        f"(default: $LEUKRAY_OUTPUT or {DEFAULT_OUTPUT})")
    p.add_argument("--endpoint-url", metavar="URL", default=None,
                   help="S3-compatible endpoint (MinIO, Ceph, moto ...); default $AWS_ENDPOINT_URL_S3 / "
                        "$AWS_ENDPOINT_URL, else AWS")
    p.add_argument("--format", "-f", choices=FORMATS, default="table", help="output format (default: table)")
    p.add_argument("--as-of", metavar="VERSION|TIMESTAMP", default=None,
                   help="time travel: the results table as of this version (e.g. 12) or time (e.g. "
                        "2026-11-28T06:00:00Z; a date means 00:00 UTC); default: the latest version")
    if since_until:
        p.add_argument("--since", metavar="YYYY-MM-DD", default=None, help="first run_date to include")
        p.add_argument("--until", metavar="YYYY-MM-DD", default=None, help="last run_date to include")
    return p


def _fraction(text: str, open_interval: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 < value < 1 if open_interval else 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1")
    return value


def _probability(text: str) -> float:
    return _fraction(text, open_interval=True)


def add_query_commands(subparsers: Any) -> None:
    """Register `query` and `report {summary,review,errors,drift,runs}` on an argparse subparsers object."""
    common = _common(since_until=False)
    dated = _common(since_until=True)

    q = subparsers.add_parser(
        "query", parents=[common], help="run SQL over the committed scoring results (view 'results')",
        description="Run one SQL statement with DuckDB over the scoring results table (its committed rows, at "
                    "the latest version or --as-of an earlier one), exposed as the view 'results' (columns of "
                    "docs/scoring.md, run_date included).",
        epilog="example: leukray query \"SELECT run_date, count(*) FROM results GROUP BY ALL ORDER BY 1\"",
    )
    q.add_argument("sql", help="the SQL statement (quote it)")
    q.set_defaults(func=_run_query)

    rep = subparsers.add_parser("report", help="canned reports over the scoring results",
                                description="Canned reports over the committed scoring results.")
    rsub = rep.add_subparsers(dest="report", metavar="{summary,review,errors,drift,runs}")
    rsub.required = True

    s = rsub.add_parser("summary", parents=[dated], help="files, ok, errors, per-class counts, mean confidence",
                        description="Per run (default) or per day: files, ok, errors, needs_review, a count per "
                                    "predicted class and the mean confidence of ok rows.")
    s.add_argument("--by", choices=("run", "day", "class"), default="run",
                   help="one row per run (default) or per day; class: the agreement between the model and the "
                        "reviewers per predicted class (`leukray review import`), which the table format also "
                        "prints after the runs when decisions exist")
    s.set_defaults(func=_run_summary)

    r = rsub.add_parser("review", parents=[dated], help="needs-review queue, lowest confidence first",
                        description="Images flagged needs_review (low confidence, out of distribution, or both: "
                                    "review_reason), lowest confidence first, with their paths.")
    r.add_argument("--reason", choices=REASONS,
                   help="only rows flagged for this reason, or by this check of the guard "
                        "(knn, optics, colour, structure)")
    r.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50; 0 = all)")
    r.add_argument("--max-confidence", type=float, default=None, help="only rows at or below this confidence")
    r.add_argument("--all", action="store_true", dest="include_reviewed",
                   help="also rows a reviewer has decided (with reviewed_class, reviewed_by, reviewed_at)")
    r.set_defaults(func=_run_review)

    e = rsub.add_parser("errors", parents=[dated], help="failed images grouped by error message",
                        description="Failed images grouped by error message: count, runs, first/last day and "
                                    "example paths; most frequent first.")
    e.add_argument("--examples", type=int, default=3, help="example paths per message (default 3)")
    e.set_defaults(func=_run_errors)

    d = rsub.add_parser("drift", parents=[dated], help="class mix per day vs the training distribution",
                        description="Predicted class proportions per day against the training distribution "
                                    "(model card class_counts), with total variation distance and a chi-square "
                                    "goodness-of-fit p-value per day.")
    d.add_argument("--model", metavar="URI", default=None,
                   help="model package folder or model folder (LATEST); default: each run's recorded model_uri")
    d.add_argument("--plot", metavar="PNG", default=None, help="also write stacked bars of the class mix per day")
    d.add_argument("--group-by", metavar="REGEX", default=None,
                   help="the shift's sign test over slides, not images: a regular expression whose one group takes "
                        "the slide or patient out of a path, e.g. '/([^/]+)/[^/]+$' (each file's folder)")
    d.add_argument("--alert", action="store_true",
                   help="for a nightly monitor: name on stderr each day whose images are not like the training "
                        "images (out-of-distribution rate or shift above chance) and exit with 1")
    d.add_argument("--alpha", type=_probability, default=ALERT_ALPHA,
                   help=f"--alert's significance level (default {ALERT_ALPHA})")
    d.add_argument("--min-shift", type=_fraction, default=ALERT_MIN_SHIFT,
                   help=f"--alert names a shift only above this fraction (default {ALERT_MIN_SHIFT}; 0.5 = as usual)")
    d.add_argument("--max-tv", type=_fraction, default=None,
                   help="--alert also names a class mix farther than this from the training split's (total "
                        "variation, 0-1; default: not checked, since a day's patients set its mix)")
    d.set_defaults(func=_run_drift)

    u = rsub.add_parser("runs", parents=[dated], help="the scoring runs recorded in the table's history",
                        description="The scoring runs recorded in the results table's history, oldest first: "
                                    "status, the table versions each made, model, times, counts, throughput.")
    u.set_defaults(func=_run_runs)


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser with just these commands (tests; `python -m leukray.query_cli`)."""
    parser = argparse.ArgumentParser(prog="leukray", description="query the leukray scoring results")
    sub = parser.add_subparsers(dest="command", metavar="{query,report}")
    sub.required = True
    add_query_commands(sub)
    return parser


# ----------------------------------------------------------------------------------------------------------------


def _results(args: argparse.Namespace):
    from .query import Results

    output = args.output or os.environ.get("LEUKRAY_OUTPUT") or DEFAULT_OUTPUT
    opts = StorageOptions(endpoint_url=args.endpoint_url) if args.endpoint_url else None
    return Results(output, opts, as_of=args.as_of)


class Report(NamedTuple):
    """What a command prints: its table, a titled second one (summary's agreement with reviewers), and alert lines
    (stderr; exit code 1)."""

    table: Any
    extra: tuple[str, Any] | None = None
    alerts: Sequence[str] = ()


def _guard(fn):
    """A command: open the results named by the arguments, run `fn(results, args)`, print its table (a `Report`:
    and its second table, and its alert lines on stderr with exit code 1); a query or storage error is one
    `error: ...` line and exit code 2."""

    def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
        from .query import QueryError
        from .storage import StorageError

        out = out or sys.stdout
        err = err or sys.stderr
        try:
            with _results(args) as results:
                table = fn(results, args)
        except (QueryError, StorageError) as e:
            err.write(f"error: {e}\n")
            return 2
        from .report import write_table

        if not isinstance(table, Report):
            table = Report(table)
        write_table(table.table, args.format, out)
        if table.extra is not None:
            out.write(f"\n{table.extra[0]}:\n")
            write_table(table.extra[1], args.format, out)
        for line in table.alerts:
            err.write(f"alert: {line}\n")
        return 1 if table.alerts else 0

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


@_guard
def _run_query(r, args: argparse.Namespace):
    return r.sql(args.sql)


@_guard
def _run_summary(r, args: argparse.Namespace):
    from .reviews import agreement

    if args.by == "class":
        return agreement(r, args.since, args.until)
    table = r.summary(args.since, args.until, by=args.by)
    agreed = agreement(r, args.since, args.until) if args.format == "table" else None
    if agreed is not None and agreed.num_rows and agreed.column("reviewed")[agreed.num_rows - 1].as_py():
        return Report(table, ("agreement with reviewers, per predicted class (leukray review import)", agreed))
    return table


@_guard
def _run_review(r, args: argparse.Namespace):
    return r.review(args.since, args.until, limit=args.limit or None, max_confidence=args.max_confidence,
                    reason=args.reason, include_reviewed=args.include_reviewed)


@_guard
def _run_errors(r, args: argparse.Namespace):
    return r.errors(args.since, args.until, examples=args.examples)


@_guard
def _run_drift(r, args: argparse.Namespace):
    from .drift import alerts

    table = r.drift(args.since, args.until, model=args.model, plot=args.plot, group_by=args.group_by)
    if args.plot:
        sys.stderr.write(f"wrote {args.plot}\n")
    if not args.alert:
        return table
    return Report(table, alerts=alerts(table, args.alpha, args.min_shift, args.max_tv))


@_guard
def _run_runs(r, args: argparse.Namespace):
    return r.run_table(args.since, args.until)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

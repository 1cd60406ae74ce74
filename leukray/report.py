"""The canned reports over the scoring results (`leukray report ...`) and their text output.

Each report is one SQL query (or a walk over the runs recorded in the table's history) over a
`leukray.query.Results`, returning a `pyarrow.Table`; `Results.summary()` etc. call these. `write_table` prints a
report as an aligned table, CSV or JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from . import CLASSES
from .query import RESULTS_VIEW, QueryError, check_date, date_where, quote_ident, quote_literal
from .results import prob_column

if TYPE_CHECKING:
    from .query import Results

REVIEW_REASONS = ("low_confidence", "out_of_distribution")
"""What `review_reason` holds, comma-separated when both apply."""
OOD_CHECKS = ("knn", "optics", "colour", "structure")
"""What `ood_check` holds for the default guard (leukray.ood.Guard.check_scores), comma-separated when several
checks flag a row; a package whose guard method is energy or msp names that method instead."""
OOD_CHECK_MEANING = {"knn": "unlike every training image", "optics": "out of focus or at another magnification",
                     "colour": "stain colours no lab gives", "structure": "no stained cells: empty or dark fields"}
REASONS = REVIEW_REASONS + OOD_CHECKS + ("energy", "msp")
"""What the review queue filters on: a review reason, or one of the guard's checks (out-of-distribution rows it
flagged)."""


def reason_filter(reason: str) -> str:
    """The SQL condition (one `?` parameter: `reason`) that keeps the rows flagged for `reason` (REASONS)."""
    if reason not in REASONS:
        raise ValueError(f"reason={reason!r}; allowed: {', '.join(REASONS)}")
    column = "review_reason" if reason in REVIEW_REASONS else "ood_check"
    return f"list_contains(string_split({column}, ','), ?)"


def sort_classes(names: Iterable[str]) -> list[str]:
    """Canonical classes in model-output order first, then any others alphabetically."""
    names = set(names)
    return [c for c in CLASSES if c in names] + sorted(names - set(CLASSES))


# -------------------------------------------------------------------------------------------------------------- reports


def _classes_in(results: Results, where: str, params: list[Any]) -> list[str]:
    t = results.sql(f"SELECT DISTINCT predicted_class AS c FROM {RESULTS_VIEW} "
                 f"WHERE predicted_class IS NOT NULL AND {where}", params)
    return sort_classes(list(CLASSES) + [c for c in t.column("c").to_pylist()])

def summary(results: Results, since: str | _dt.date | None = None, until: str | _dt.date | None = None,
            by: str = "run") -> pa.Table:
    """Per run (`by="run"`) or per day (`by="day"`): files (rows scored), ok, errors, needs_review, one count
    column per predicted class, mean confidence (ok rows). Committed runs with no rows appear with 0."""
    if by not in ("run", "day"):
        raise QueryError(f"summary by must be 'run' or 'day', got {by!r}")
    since, until = check_date(since, "since"), check_date(until, "until")
    where, params = date_where(since, until)
    classes = _classes_in(results, where, params)
    class_cols = ", ".join(
        f"count(*) FILTER (WHERE status = 'ok' AND predicted_class = {quote_literal(c)}) AS {quote_ident(c)}"
        for c in classes
    )
    counts = (
        "count(*) AS files, "
        "count(*) FILTER (WHERE status = 'ok') AS ok, "
        "count(*) FILTER (WHERE status <> 'ok' OR status IS NULL) AS errors, "
        "count(*) FILTER (WHERE needs_review) AS needs_review, "
        "count(*) FILTER (WHERE NOT in_distribution) AS out_of_distribution, "
        f"{class_cols}, "
        "avg(confidence) FILTER (WHERE status = 'ok') AS mean_confidence"
    )
    if by == "run":
        table = results.sql(
            f"SELECT run_id, min(run_date) AS run_date, "
            f"string_agg(DISTINCT model_name || ':' || model_version, ', ') AS model, "
            f"min(scored_at) AS first_scored_at, max(scored_at) AS last_scored_at, {counts} "
            f"FROM {RESULTS_VIEW} WHERE {where} GROUP BY run_id ORDER BY run_date, run_id",
            params,
        )
        return _add_empty_runs(results, table, since, until)
    return results.sql(
        f"SELECT run_date, count(DISTINCT run_id) AS runs, {counts} "
        f"FROM {RESULTS_VIEW} WHERE {where} GROUP BY run_date ORDER BY run_date",
        params,
    )

def _add_empty_runs(results: Results, table: pa.Table, since: str | None, until: str | None) -> pa.Table:
    """Committed runs that wrote no rows (nothing new to score) still belong in a per-run summary."""
    seen = set(table.column("run_id").to_pylist())
    empty = [r for r in results.runs if r.run_id not in seen and not r.rows
             and (since is None or (r.run_date or "") >= since)
             and (until is None or (r.run_date or "9999") <= until)]
    if not empty:
        return table
    rows = []
    for r in empty:
        row: dict[str, Any] = {name: None for name in table.schema.names}
        row.update(run_id=r.run_id, run_date=r.run_date)
        if r.model_name:
            row["model"] = f"{r.model_name}:{r.model_version}"
        for name in table.schema.names:
            if pa.types.is_integer(table.schema.field(name).type):
                row[name] = 0
        rows.append(row)
    extra = pa.Table.from_pylist(rows, schema=table.schema)
    merged = pa.concat_tables([table, extra])
    return merged.sort_by([("run_date", "ascending"), ("run_id", "ascending")])

def review(results: Results, since: str | _dt.date | None = None, until: str | _dt.date | None = None,
           limit: int | None = 100, max_confidence: float | None = None, reason: str | None = None,
           include_reviewed: bool = False) -> pa.Table:
    """The needs-review queue: ok rows flagged `needs_review` (why: `review_reason`, and for an out-of-distribution
    row which of the guard's checks objected: `ood_check`), lowest confidence first
    (ties by path). `reason`: only rows flagged for `low_confidence` or for `out_of_distribution`, or by one of the
    guard's checks (`knn`, `colour`, `structure`: e.g. every empty field at once). Rows a reviewer has decided
    (`leukray review import`) are left out unless `include_reviewed`."""
    since, until = check_date(since, "since"), check_date(until, "until")
    where, params = date_where(since, until)
    if max_confidence is not None:
        where += " AND confidence <= ?"
        params.append(float(max_confidence))
    if reason is not None:
        try:
            where += " AND " + reason_filter(reason)
        except ValueError as err:
            raise QueryError(str(err)) from None
        params.append(reason)
    if not include_reviewed:
        where += " AND reviewed_class IS NULL"
    probs = ", ".join(prob_column(c) for c in CLASSES if prob_column(c) in results.columns())
    sql = (f"SELECT path, confidence, predicted_class, review_reason, ood_check, ood_score, {probs}, run_date, "
           f"run_id, model_name, model_version, scored_at"
           + (", reviewed_class, reviewed_by, reviewed_at" if include_reviewed else "") +
           f" FROM {RESULTS_VIEW} WHERE needs_review AND status = 'ok' AND {where} "
           f"ORDER BY confidence ASC NULLS LAST, path, run_id")
    if limit is not None:
        if int(limit) < 0:
            raise QueryError(f"limit must be >= 0, got {limit}")
        sql += f" LIMIT {int(limit)}"
    return results.sql(sql, params)


def errors(results: Results, since: str | _dt.date | None = None, until: str | _dt.date | None = None,
           examples: int = 3) -> pa.Table:
    """Failed rows grouped by error message: count, first/last run_date, up to `examples` example paths
    (alphabetical), most frequent first."""
    since, until = check_date(since, "since"), check_date(until, "until")
    where, params = date_where(since, until)
    n = max(int(examples), 0)
    return results.sql(
        f"SELECT coalesce(error, '(no message)') AS error, count(*) AS count, "
        f"count(DISTINCT run_id) AS runs, min(run_date) AS first_run_date, max(run_date) AS last_run_date, "
        f"list_slice(list(DISTINCT path ORDER BY path), 1, {n}) AS example_paths "
        f"FROM {RESULTS_VIEW} WHERE (status <> 'ok' OR status IS NULL) AND {where} "
        f"GROUP BY 1 ORDER BY count DESC, error",
        params,
    )


def run_table(results: Results, since: str | _dt.date | None = None, until: str | _dt.date | None = None) -> pa.Table:
    """The scoring runs recorded in the table's history (each commit of a run carries its record; the last
    one counts), oldest first: status (committed, running = stopped after interval commits, failed), the
    table versions it made, model, times, counts and throughput."""
    since, until = check_date(since, "since"), check_date(until, "until")
    rows = []
    for r in results.runs:
        if (since and (r.run_date or "") < since) or (until and (r.run_date or "9999") > until):
            continue
        raw = r.raw
        c, t, e = raw.get("counts") or {}, raw.get("throughput") or {}, raw.get("execution") or {}
        rows.append({
            "run_id": r.run_id, "run_date": r.run_date, "status": r.status,
            "first_version": min(r.versions), "last_version": max(r.versions), "commits": len(r.versions),
            "model": f"{r.model_name}:{r.model_version}" if r.model_name else None,
            "started_at": raw.get("started_at"), "committed_at": r.committed_at,
            "seen": c.get("seen"), "scored": c.get("scored"), "skipped": c.get("skipped"),
            "errors": c.get("errors"), "deferred": c.get("deferred"), "rows": raw.get("rows"),
            "images_per_s": t.get("images_per_s"), "device": e.get("device"), "backend": e.get("backend"),
            "tta": e.get("tta"), "input": raw.get("input"),
        })
    schema = pa.schema([
        ("run_id", pa.string()), ("run_date", pa.string()), ("status", pa.string()),
        ("first_version", pa.int64()), ("last_version", pa.int64()), ("commits", pa.int64()),
        ("model", pa.string()), ("started_at", pa.string()), ("committed_at", pa.timestamp("ms", tz="UTC")),
        ("seen", pa.int64()), ("scored", pa.int64()), ("skipped", pa.int64()), ("errors", pa.int64()),
        ("deferred", pa.int64()), ("rows", pa.int64()), ("images_per_s", pa.float64()), ("device", pa.string()),
        ("backend", pa.string()), ("tta", pa.string()), ("input", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)



# ---------------------------------------------------------------------------------------------------------- text output


def _cell(value: Any, float_digits: int = 4) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and abs(value) < 10 ** -float_digits * 5:
            return f"{value:.{float_digits - 1}e}"
        return f"{value:.{float_digits}f}"
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "; ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def format_table(table: pa.Table, max_width: int = 160) -> str:
    """An aligned text table (numbers right-aligned), with a row count line."""
    names = table.schema.names
    rows = [[_cell(v) for v in row.values()] for row in table.to_pylist()]
    rows = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in r] for r in rows]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_decimal(f.type)
               for f in table.schema]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(list(names)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(out)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "as_tuple"):  # Decimal
        return float(value)
    return value


def write_table(table: pa.Table, fmt: str, out: Any) -> None:
    """Write `table` to the text stream `out` as 'table' (aligned), 'csv' (header, lists joined by '; ', NULL
    as empty) or 'json' (an array of objects; NaN/inf become null)."""
    if fmt == "table":
        out.write(format_table(table) + "\n")
    elif fmt == "csv":
        import csv

        w = csv.writer(out, lineterminator="\n")
        w.writerow(table.schema.names)
        for row in table.to_pylist():
            w.writerow(["" if v is None else (repr(v) if isinstance(v, float) else _cell(v))
                        for v in row.values()])
    elif fmt == "json":
        out.write(json.dumps([{k: _json_value(v) for k, v in row.items()} for row in table.to_pylist()],
                             indent=2, default=str) + "\n")
    else:
        raise QueryError(f"unknown output format {fmt!r}: use table, csv or json")

"""Reviewers' decisions: a `reviews` Delta table beside the scoring results, and how they join the `results` view.

Layout: `<output>/_reviews/` is a Delta table of its own (same storage as the results: local folder or s3://, the
same deltalake options — on S3 a commit is a put-if-absent of the next log entry, so two imports never both take
one version). The leading underscore keeps it out of the results table: Delta readers and the results' vacuum
skip folders that start with `_`.

A decision names the scoring row it concerns (path, source_version, model_name, model_version), the class the model
predicted, the reviewer's class (one of the four, or "not assessable"), who and when. Importing is a MERGE on
(path, source_version, model_name, model_version, reviewer, reviewed_at): the same file imported twice adds
nothing. The `results` view gains `reviewed_class`, `reviewed_by`, `reviewed_at`: the latest decision per path.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import time
from typing import Any

import pyarrow as pa

from . import CLASSES, results, storage
from .config import StorageOptions

REVIEWS_DIR = "_reviews"
NOT_ASSESSABLE = "not assessable"
DECISIONS: tuple[str, ...] = CLASSES + (NOT_ASSESSABLE,)
CSV_COLUMNS = ["path", "source_version", "model_name", "model_version", "predicted_class", "reviewed_class",
               "reviewer", "reviewed_at"]
"""The columns of the page's "Export decisions" CSV, the input of `leukray review import`."""
KEY = ["path", "source_version", "model_name", "model_version", "reviewer", "reviewed_at"]
REVIEWS_SCHEMA = pa.schema([
    ("path", pa.string()), ("source_version", pa.string()), ("model_name", pa.string()),
    ("model_version", pa.string()), ("predicted_class", pa.string()), ("reviewed_class", pa.string()),
    ("reviewer", pa.string()), ("reviewed_at", pa.timestamp("us", tz="UTC")),
    ("imported_at", pa.timestamp("us", tz="UTC")), ("import_file", pa.string())])
VIEW_COLUMNS = ("reviewed_class", "reviewed_by", "reviewed_at")
_MAX_LISTED = 20


class ReviewError(ValueError):
    """Decisions cannot be read or imported; the message names the file, line and column at fault."""


def reviews_uri(output: str) -> str:
    return storage.join(str(output).rstrip("/"), REVIEWS_DIR)


# ------------------------------------------------------------------------------------------------ reading a CSV
def _parse_time(value: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(value.strip())
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)


def read_decisions(uri: str, opts: StorageOptions | None = None) -> tuple[pa.Table, list[int]]:
    """The decisions of a CSV (local or s3://) as REVIEWS_SCHEMA rows without the import columns, and the line
    number of each row. Every problem is a ReviewError naming file, line and column; nothing is half-read."""
    try:
        text = storage.read_bytes(uri, opts).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ReviewError(f"{uri}: not UTF-8 text ({err})") from None
    except FileNotFoundError:
        raise ReviewError(f"{uri}: no such file") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ReviewError(f"{uri}: empty file; expected a header line with {', '.join(CSV_COLUMNS)}") from None
    except csv.Error as err:
        raise ReviewError(f"{uri}: line 1: malformed CSV ({err})") from None
    header = [h.strip() for h in header]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise ReviewError(f"{uri}: line 1: the header lacks column(s) {', '.join(missing)} "
                          f"(expected {', '.join(CSV_COLUMNS)}; got {', '.join(header)})")
    where = {c: header.index(c) for c in CSV_COLUMNS}
    rows: dict[str, list[Any]] = {c: [] for c in CSV_COLUMNS}
    lines: list[int] = []
    try:
        for fields in reader:
            line = reader.line_num
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise ReviewError(f"{uri}: line {line}: {len(fields)} fields, the header has {len(header)}")
            rec = {c: fields[i].strip() for c, i in where.items()}
            for c in ("path", "source_version", "model_name", "model_version", "reviewer", "reviewed_class"):
                if not rec[c]:
                    raise ReviewError(f"{uri}: line {line}, column {c}: empty")
            if rec["reviewed_class"] not in DECISIONS:
                raise ReviewError(f"{uri}: line {line}, column reviewed_class: {rec['reviewed_class']!r} is not a "
                                  f"decision; allowed: {', '.join(DECISIONS)}")
            if rec["predicted_class"] and rec["predicted_class"] not in CLASSES:
                raise ReviewError(f"{uri}: line {line}, column predicted_class: {rec['predicted_class']!r} is not "
                                  f"a class; allowed: {', '.join(CLASSES)}")
            try:
                rec["reviewed_at"] = _parse_time(rec["reviewed_at"])
            except ValueError:
                raise ReviewError(f"{uri}: line {line}, column reviewed_at: {rec['reviewed_at']!r} is not an ISO "
                                  f"8601 time (e.g. 2026-12-04T09:15:00Z)") from None
            rec["predicted_class"] = rec["predicted_class"] or None
            for c in CSV_COLUMNS:
                rows[c].append(rec[c])
            lines.append(line)
    except csv.Error as err:
        raise ReviewError(f"{uri}: line {reader.line_num}: malformed CSV ({err})") from None
    schema = pa.schema([REVIEWS_SCHEMA.field(c) for c in CSV_COLUMNS])
    return pa.table(rows, schema=schema), lines


# ------------------------------------------------------------------------------------------------ the table
def _storage_options(output: str, opts: StorageOptions | None) -> dict[str, str] | None:
    return results.delta_storage_options(output, opts)


def read_reviews(output: str, opts: StorageOptions | None = None,
                 as_of: dt.datetime | None = None) -> pa.Table:
    """Every imported decision (empty REVIEWS_SCHEMA table when none yet); `as_of`: those imported by then."""
    from deltalake import DeltaTable

    uri = reviews_uri(output)
    so = _storage_options(output, opts)
    if not DeltaTable.is_deltatable(results.table_uri(uri), storage_options=so):
        return REVIEWS_SCHEMA.empty_table()
    table = DeltaTable(results.table_uri(uri), storage_options=so).to_pyarrow_table()
    table = table.select(REVIEWS_SCHEMA.names).cast(REVIEWS_SCHEMA)
    if as_of is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.less_equal(table["imported_at"], pa.scalar(as_of, REVIEWS_SCHEMA.field(
            "imported_at").type)))
    return table


def _unknown_rows(decisions: pa.Table, lines: list[int], output: str, opts: StorageOptions | None) -> list[str]:
    """Decisions whose (path, source_version, model_name, model_version) is no row of the results table."""
    import pyarrow.dataset as pads

    key = ["path", "source_version", "model_name", "model_version"]
    d = results.dataset(results.open_table(output, opts), output, opts)
    paths = pa.array(sorted(set(decisions["path"].to_pylist())), pa.string())
    scored = d.to_table(columns=key, filter=pads.field("path").isin(paths))
    known = {tuple(r[k] for k in key) for r in scored.to_pylist()}
    known_paths = {r[0] for r in known}
    out = []
    for line, rec in zip(lines, decisions.select(key).to_pylist()):
        if tuple(rec[k] for k in key) in known:
            continue
        why = ("was never scored" if rec["path"] not in known_paths else
               f"has no row scored by {rec['model_name']} {rec['model_version']} at source_version "
               f"{rec['source_version']}")
        out.append(f"line {line}: {rec['path']} {why}")
    return out


def import_decisions(csv_uri: str, output: str, opts: StorageOptions | None = None) -> dict[str, Any]:
    """Append the decisions of `csv_uri` to the reviews table of `output` in one commit. Rows already there (same
    key) are skipped, so importing a file twice adds nothing. Decisions about files the results table never
    scored are rejected with their line numbers, and then nothing is written."""
    from deltalake import DeltaTable, Schema
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import CommitProperties

    decisions, lines = read_decisions(csv_uri, opts)
    try:
        unknown = _unknown_rows(decisions, lines, output, opts) if decisions.num_rows else []
    except results.ResultsError as err:
        raise ReviewError(f"cannot check {csv_uri} against the results table: {err}") from None
    if unknown:
        more = f"\n  … and {len(unknown) - _MAX_LISTED} more" if len(unknown) > _MAX_LISTED else ""
        raise ReviewError(f"{csv_uri}: {len(unknown)} decision(s) name files the results table {output} does not "
                          f"hold; nothing imported:\n  " + "\n  ".join(unknown[:_MAX_LISTED]) + more)
    n_read = decisions.num_rows
    decisions = decisions.group_by(KEY, use_threads=False).aggregate([(c, "last") for c in CSV_COLUMNS if c not in KEY])
    decisions = decisions.rename_columns([c.removesuffix("_last") for c in decisions.column_names])
    now = dt.datetime.now(dt.timezone.utc)
    decisions = decisions.append_column("imported_at", pa.array([now] * decisions.num_rows,
                                                               REVIEWS_SCHEMA.field("imported_at").type))
    decisions = decisions.append_column("import_file", pa.array([csv_uri] * decisions.num_rows, pa.string()))
    decisions = decisions.select(REVIEWS_SCHEMA.names).cast(REVIEWS_SCHEMA)

    uri, so = results.table_uri(reviews_uri(output)), _storage_options(output, opts)
    if not storage.is_remote(output):
        os.makedirs(uri, exist_ok=True)
    predicate = " AND ".join(f"t.{k} = s.{k}" for k in KEY)
    record = {"import_file": csv_uri, "rows_read": n_read, "imported_at": now.isoformat()}
    last: Exception | None = None
    for attempt in range(20):
        try:
            if not DeltaTable.is_deltatable(uri, storage_options=so):
                DeltaTable.create(uri, Schema.from_arrow(REVIEWS_SCHEMA), mode="ignore", name="leukray_reviews",
                                  description="leukray review decisions (docs/review.md)",
                                  configuration={"delta.logRetentionDuration": results.LOG_RETENTION},
                                  storage_options=so)
            table = DeltaTable(uri, storage_options=so)
            if not decisions.num_rows:
                return {"file": csv_uri, "read": n_read, "added": 0, "already": 0, "version": table.version()}
            metrics = (table.merge(decisions, predicate, source_alias="s", target_alias="t",
                                   commit_properties=CommitProperties(custom_metadata={"leukray_review": record}))
                       .when_not_matched_insert_all().execute())
            added = int(metrics.get("num_target_rows_inserted", 0))
            return {"file": csv_uri, "read": n_read, "added": added, "already": decisions.num_rows - added,
                    "version": DeltaTable(uri, storage_options=so).version()}
        except CommitFailedError as err:  # another import committed first: merge again against its rows
            last = err
            time.sleep(min(2.0, 0.1 * (attempt + 1)))
        except DeltaError as err:
            raise ReviewError(f"cannot write the reviews table {reviews_uri(output)}: {err}") from None
    raise ReviewError(f"could not commit to {reviews_uri(output)} after 20 attempts: {last}")


# ------------------------------------------------------------------------------------------------ the view
def register_results_view(con, name: str, dataset, output: str, opts: StorageOptions | None = None,
                          as_of: Any = None) -> None:
    """Register `name` in DuckDB as the scored rows plus the latest decision per path (null when none)."""
    when = as_of if isinstance(as_of, dt.datetime) else None
    con.register(f"_{name}_scored", dataset)
    con.register(f"_{name}_reviews", read_reviews(output, opts, when))
    con.execute(
        f"CREATE OR REPLACE VIEW {name} AS SELECT s.*, v.reviewed_class, v.reviewed_by, v.reviewed_at "
        f"FROM _{name}_scored s LEFT JOIN (SELECT path, arg_max(reviewed_class, reviewed_at) AS reviewed_class, "
        f"arg_max(reviewer, reviewed_at) AS reviewed_by, max(reviewed_at) AS reviewed_at "
        f"FROM _{name}_reviews GROUP BY path) v ON s.path = v.path")


def agreement(res, since: str | None = None, until: str | None = None) -> pa.Table:
    """Per predicted class (ok rows with a decision, run_date in the window): reviewed, not assessable, agreed (the
    reviewer chose the model's class), agreement = agreed / assessable; `all` last."""
    conds, params = ["status = 'ok'", "reviewed_class IS NOT NULL"], []
    for op, value in ((">=", since), ("<=", until)):
        if value:
            conds.append(f"run_date {op} ?")
            params.append(value)
    body = (f"count(*) AS reviewed, count(*) FILTER (WHERE reviewed_class = '{NOT_ASSESSABLE}') AS not_assessable, "
            "count(*) FILTER (WHERE reviewed_class = predicted_class) AS agreed, "
            "count(*) FILTER (WHERE reviewed_class = predicted_class) / "
            f"nullif(count(*) FILTER (WHERE reviewed_class <> '{NOT_ASSESSABLE}'), 0) AS agreement")
    where = " AND ".join(conds)
    order = ", ".join(f"'{c}'" for c in CLASSES)
    return res.sql(
        f"SELECT predicted_class, {body} FROM results WHERE {where} GROUP BY predicted_class "
        f"UNION ALL SELECT 'all', {body} FROM results WHERE {where} "
        f"ORDER BY coalesce(list_position([{order}, 'all'], predicted_class), 99), predicted_class",
        params + params)

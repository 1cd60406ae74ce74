"""SQL and canned reports over the scoring results table (DuckDB over an Arrow dataset of a Delta table).

The scoring job (`leukray/score.py`) writes the results as a Delta Lake table at its `output` (leukray/results.py:
data files under `run_date=YYYY-MM-DD/`, the transaction log `_delta_log/`). Only rows of committed files are
visible: the files of a run that died before its commit never show up, in any Delta reader.

No DuckDB extension is loaded (neither delta nor httpfs): deltalake reads the log and lists the table's files at
the chosen version, and those files are opened as one `pyarrow.dataset` through Arrow's own filesystem for the
same location (`storage.arrow_filesystem`: local folder or s3:// on any S3-compatible endpoint; no Python
callbacks while DuckDB scans), registered in DuckDB as the view `results`, with the partition column `run_date`
(a `YYYY-MM-DD` string).

Time travel: `as_of` (a table version, or a time: the table as it was then) shows the table as an earlier version.

    >>> r = Results("s3://lab-scores/score", StorageOptions(endpoint_url="http://127.0.0.1:9000"))
    >>> r.sql("SELECT predicted_class, count(*) AS n FROM results GROUP BY ALL").to_pandas()
    >>> r.summary(since="2026-11-01")            # per run; by="day" for per day
    >>> r.review(limit=50)                       # needs-review queue, lowest confidence first
    >>> r.errors()                               # grouped error messages
    >>> r.drift(plot="mix.png")                  # class mix per day vs the model card's training mix
    >>> r.run_table()                            # the runs recorded in the table's history
    >>> Results(uri, as_of="2026-11-28T06:00:00Z").review()    # the queue as it was that morning

Every report returns a `pyarrow.Table`; `Results.to_pandas(table_or_sql)` gives a pandas frame.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from . import CLASSES, results, storage
from .config import StorageOptions
from .results import RESULTS_SCHEMA, Run, prob_column

__all__ = [
    "QueryError",
    "NoRunsError",
    "Results",
    "Run",
    "RESULTS_SCHEMA",
    "RESULTS_VIEW",
    "prob_column",
    "format_table",
    "write_table",
    "plot_class_mix",
    "load_model_card",
]

RESULTS_VIEW = "results"
REVIEW_REASONS = ("low_confidence", "out_of_distribution")
"""What `review_reason` holds, comma-separated when both apply."""
"""Name of the DuckDB view over all committed rows."""


_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class QueryError(ValueError):
    """A query or report cannot run; the message says what is wrong and where (location, SQL, file)."""


class NoRunsError(QueryError):
    """The output location holds no committed scoring run."""


class LegacyLayoutError(QueryError):
    """The output location holds results in the previous layout; the message names the conversion command."""


RunManifest = Run  # the name this module used before runs lived in the table's history


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _check_date(value: str | _dt.date | None, name: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, _dt.datetime):
        value = value.date()
    if isinstance(value, _dt.date):
        return value.isoformat()
    value = str(value).strip()
    if not _DATE_RE.match(value):
        raise QueryError(f"{name} must be a date YYYY-MM-DD, got {value!r}")
    try:
        _dt.date.fromisoformat(value)
    except ValueError:
        raise QueryError(f"{name} is not a valid date: {value!r}") from None
    return value


def _date_where(since: str | None, until: str | None, column: str = "run_date") -> tuple[str, list[Any]]:
    """SQL condition (without WHERE) and parameters for the run_date window; 'TRUE' when unbounded."""
    conds, params = [], []
    if since:
        conds.append(f"{column} >= ?")
        params.append(since)
    if until:
        conds.append(f"{column} <= ?")
        params.append(until)
    return (" AND ".join(conds) or "TRUE"), params


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sort_classes(names: Iterable[str]) -> list[str]:
    """Canonical classes in model-output order first, then any others alphabetically."""
    names = set(names)
    return [c for c in CLASSES if c in names] + sorted(names - set(CLASSES))


def _to_arrow(rel: Any) -> pa.Table:
    for attr in ("to_arrow_table", "fetch_arrow_table", "arrow"):
        fn = getattr(rel, attr, None)
        if fn is not None:
            out = fn()
            return out.read_all() if isinstance(out, pa.RecordBatchReader) else out
    raise QueryError("this DuckDB version cannot return Arrow tables")  # pragma: no cover


# ----------------------------------------------------------------------------------------------------------------
# the results handle


class Results:
    """The scoring results table at `output_uri` (local folder or s3://bucket/prefix), queryable with SQL.

    `as_of`: a table version (int, or digits) or a time (ISO 8601 or datetime; naive = UTC): the table as it was
    then. The table is opened lazily on first use and cached; call `refresh()` to see newer commits.
    """

    def __init__(self, output_uri: str, storage: StorageOptions | None = None, *, threads: int | None = None,
                 as_of: int | str | _dt.datetime | None = None):
        self.output_uri = str(output_uri).rstrip("/") or str(output_uri)
        self.storage = storage
        self.threads = threads
        try:
            self.as_of = results.parse_as_of(as_of)
        except results.ResultsError as err:
            raise QueryError(str(err)) from None
        self._table = None
        self._runs: list[Run] | None = None
        self._dataset = None
        self._con = None

    # -- the table -----------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Forget the cached table version, dataset and connection."""
        if self._con is not None:
            self._con.close()
        self._con = None
        self._dataset = None
        self._runs = None
        self._table = None

    @property
    def table(self):
        """The `deltalake.DeltaTable` at the chosen version."""
        if self._table is None:
            try:
                self._table = results.open_table(self.output_uri, self.storage, self.as_of)
            except results.LegacyLayoutError as err:
                raise LegacyLayoutError(str(err)) from None
            except results.NoRunsError as err:
                raise NoRunsError(str(err)) from None
            except results.ResultsError as err:
                raise QueryError(str(err)) from None
        return self._table

    @property
    def version(self) -> int:
        """The table version the view shows."""
        return self.table.version()

    @property
    def runs(self) -> list[Run]:
        """The scoring runs recorded in the table's history (up to the chosen version), oldest first."""
        if self._runs is None:
            runs = results.runs(self.table)
            if not runs:
                raise NoRunsError(f"no scoring runs found under {self.output_uri} (the table's history records none"
                                  + (f" up to version {self.version}" if self.as_of is not None else "") + ")")
            self._runs = runs
        return self._runs

    @property
    def files(self) -> list[str]:
        """The data files of the chosen version (paths relative to the table)."""
        return list(self.table.get_add_actions(flatten=True).column("path").to_pylist())

    # -- dataset + DuckDB ----------------------------------------------------------------------------------

    @property
    def dataset(self):
        """A `pyarrow.dataset.Dataset` over exactly the files of the chosen version, `run_date` from the log."""
        if self._dataset is None:
            if self.version <= 0:  # only the table's creation: no scoring run has committed yet (history not read:
                # a plain query stays cheap however many runs the log holds)
                raise NoRunsError(f"no scoring runs found under {self.output_uri} (the table has no commit of a "
                                  f"scoring run" + (f" at version {self.version})" if self.as_of is not None else ")"))
            try:
                self._dataset = results.dataset(self.table, self.output_uri, self.storage)
            except (pa.ArrowInvalid, OSError) as err:
                raise QueryError(f"cannot open the scoring results under {self.output_uri}: {err}") from None
        return self._dataset

    @property
    def connection(self):
        """The DuckDB connection with the view `results` registered (created on first use)."""
        if self._con is None:
            import duckdb

            con = duckdb.connect(":memory:")
            try:
                con.execute("SET TimeZone = 'UTC'")
            except duckdb.Error:  # pragma: no cover - ICU not built in
                pass
            if self.threads:
                con.execute(f"SET threads = {int(self.threads)}")
            from .reviews import register_results_view

            register_results_view(con, RESULTS_VIEW, self.dataset, self.output_uri, self.storage, self.as_of)
            self._con = con
        return self._con

    def columns(self) -> list[str]:
        from .reviews import VIEW_COLUMNS

        return list(self.dataset.schema.names) + list(VIEW_COLUMNS)

    def sql(self, query: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Run one SQL statement over the view `results`; DuckDB errors come back as `QueryError` naming the
        location and the statement."""
        import duckdb

        if not query or not query.strip():
            raise QueryError(f"empty SQL statement (query over {self.output_uri})")
        con = self.connection
        try:
            rel = con.sql(query, params=list(params) if params else None)
            if rel is None:  # a statement without a result (SET, CREATE VIEW ...)
                return pa.table({})
            return _to_arrow(rel)
        except duckdb.Error as err:
            raise QueryError(self._explain(err, query)) from None

    def _explain(self, err: Exception, query: str) -> str:
        import duckdb

        kind = {
            duckdb.ParserException: "malformed SQL",
            duckdb.BinderException: "unknown column, table or function",
            duckdb.CatalogException: "unknown table or function",
            duckdb.ConversionException: "type conversion failed",
        }
        what = next((v for k, v in kind.items() if isinstance(err, k)), type(err).__name__)
        msg = str(err).strip()
        lines = [
            f"{what} in query over {self.output_uri} (view '{RESULTS_VIEW}': table version {self.version}, "
            f"{len(self.runs)} runs, {len(self.files)} files): {msg}",
            f"  SQL: {' '.join(query.split())}",
        ]
        if isinstance(err, (duckdb.BinderException, duckdb.CatalogException)):
            lines.append(f"  columns of '{RESULTS_VIEW}': {', '.join(self.columns())}")
        return "\n".join(lines)

    def df(self, query: str, params: Sequence[Any] | None = None):
        """`sql()` as a pandas DataFrame."""
        return self.sql(query, params).to_pandas()

    def to_pandas(self, table_or_sql: pa.Table | str):
        """A pandas DataFrame from a report's table or from a SQL string."""
        if isinstance(table_or_sql, str):
            return self.df(table_or_sql)
        return table_or_sql.to_pandas()

    def close(self) -> None:
        self.refresh()

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reports -------------------------------------------------------------------------------------------

    def _classes_in(self, where: str, params: list[Any]) -> list[str]:
        t = self.sql(f"SELECT DISTINCT predicted_class AS c FROM {RESULTS_VIEW} "
                     f"WHERE predicted_class IS NOT NULL AND {where}", params)
        return _sort_classes(list(CLASSES) + [c for c in t.column("c").to_pylist()])

    def summary(self, since: str | _dt.date | None = None, until: str | _dt.date | None = None,
                by: str = "run") -> pa.Table:
        """Per run (`by="run"`) or per day (`by="day"`): files (rows scored), ok, errors, needs_review, one count
        column per predicted class, mean confidence (ok rows). Committed runs with no rows appear with 0."""
        if by not in ("run", "day"):
            raise QueryError(f"summary by must be 'run' or 'day', got {by!r}")
        since, until = _check_date(since, "since"), _check_date(until, "until")
        where, params = _date_where(since, until)
        classes = self._classes_in(where, params)
        class_cols = ", ".join(
            f"count(*) FILTER (WHERE status = 'ok' AND predicted_class = {_quote_literal(c)}) AS {_quote_ident(c)}"
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
            table = self.sql(
                f"SELECT run_id, min(run_date) AS run_date, "
                f"string_agg(DISTINCT model_name || ':' || model_version, ', ') AS model, "
                f"min(scored_at) AS first_scored_at, max(scored_at) AS last_scored_at, {counts} "
                f"FROM {RESULTS_VIEW} WHERE {where} GROUP BY run_id ORDER BY run_date, run_id",
                params,
            )
            return self._add_empty_runs(table, since, until)
        return self.sql(
            f"SELECT run_date, count(DISTINCT run_id) AS runs, {counts} "
            f"FROM {RESULTS_VIEW} WHERE {where} GROUP BY run_date ORDER BY run_date",
            params,
        )

    def _add_empty_runs(self, table: pa.Table, since: str | None, until: str | None) -> pa.Table:
        """Committed runs that wrote no rows (nothing new to score) still belong in a per-run summary."""
        seen = set(table.column("run_id").to_pylist())
        empty = [r for r in self.runs if r.run_id not in seen and not r.rows
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

    def review(self, since: str | _dt.date | None = None, until: str | _dt.date | None = None,
               limit: int | None = 100, max_confidence: float | None = None, reason: str | None = None,
               include_reviewed: bool = False) -> pa.Table:
        """The needs-review queue: ok rows flagged `needs_review` (why: `review_reason`), lowest confidence first
        (ties by path). `reason`: only rows flagged for `low_confidence` or for `out_of_distribution`. Rows a
        reviewer has decided (`leukray review import`) are left out unless `include_reviewed`."""
        since, until = _check_date(since, "since"), _check_date(until, "until")
        where, params = _date_where(since, until)
        if max_confidence is not None:
            where += " AND confidence <= ?"
            params.append(float(max_confidence))
        if reason is not None:
            if reason not in REVIEW_REASONS:
                raise QueryError(f"reason={reason!r}; allowed: {', '.join(REVIEW_REASONS)}")
            where += " AND list_contains(string_split(review_reason, ','), ?)"
            params.append(reason)
        if not include_reviewed:
            where += " AND reviewed_class IS NULL"
        probs = ", ".join(prob_column(c) for c in CLASSES if prob_column(c) in self.columns())
        sql = (f"SELECT path, confidence, predicted_class, review_reason, ood_score, {probs}, run_date, run_id, "
               f"model_name, model_version, scored_at"
               + (", reviewed_class, reviewed_by, reviewed_at" if include_reviewed else "") +
               f" FROM {RESULTS_VIEW} WHERE needs_review AND status = 'ok' AND {where} "
               f"ORDER BY confidence ASC NULLS LAST, path, run_id")
        if limit is not None:
            if int(limit) < 0:
                raise QueryError(f"limit must be >= 0, got {limit}")
            sql += f" LIMIT {int(limit)}"
        return self.sql(sql, params)

    def errors(self, since: str | _dt.date | None = None, until: str | _dt.date | None = None,
               examples: int = 3) -> pa.Table:
        """Failed rows grouped by error message: count, first/last run_date, up to `examples` example paths
        (alphabetical), most frequent first."""
        since, until = _check_date(since, "since"), _check_date(until, "until")
        where, params = _date_where(since, until)
        n = max(int(examples), 0)
        return self.sql(
            f"SELECT coalesce(error, '(no message)') AS error, count(*) AS count, "
            f"count(DISTINCT run_id) AS runs, min(run_date) AS first_run_date, max(run_date) AS last_run_date, "
            f"list_slice(list(DISTINCT path ORDER BY path), 1, {n}) AS example_paths "
            f"FROM {RESULTS_VIEW} WHERE (status <> 'ok' OR status IS NULL) AND {where} "
            f"GROUP BY 1 ORDER BY count DESC, error",
            params,
        )

    # -- runs ----------------------------------------------------------------------------------------------

    def run_table(self, since: str | _dt.date | None = None, until: str | _dt.date | None = None) -> pa.Table:
        """The scoring runs recorded in the table's history (each commit of a run carries its record; the last
        one counts), oldest first: status (committed, running = stopped after interval commits, failed), the
        table versions it made, model, times, counts and throughput."""
        since, until = _check_date(since, "since"), _check_date(until, "until")
        rows = []
        for r in self.runs:
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

    # -- drift ---------------------------------------------------------------------------------------------

    def model_card(self, model_uri: str, version: str | None = None) -> dict[str, Any]:
        """The model card of a package folder (has model_card.json) or a model folder (`version`, else LATEST)."""
        return load_model_card(model_uri, self.storage, version)

    def drift(self, since: str | _dt.date | None = None, until: str | _dt.date | None = None,
              model: str | None = None, plot: str | None = None) -> pa.Table:
        """Class mix per day (ok rows) against the training distribution (model card "class_counts").

        `model`: a package or model folder URI used for every day; by default each run's recorded "model_uri"
        (with the run's model_version) is used, so a day scored by two models gives one row per model.
        Rows with `source="training"` hold the training proportions (one per model card); rows with
        `source="scored"` one day each, with `tv_distance` (total variation, 0..1), `chi2` and `p_value`
        (chi-square goodness of fit of the day's counts to the training proportions; df = classes - 1), and
        `ood_rate`: the fraction of the day's rows the out-of-distribution guard flagged (training rows: the
        validation split's, by construction about 1 - in_fraction; null where the model has no guard). A rising
        rate says the images changed: another camera, stain, or something that is not a smear.
        """
        since, until = _check_date(since, "since"), _check_date(until, "until")
        where, params = _date_where(since, until)
        counts = self.sql(
            f"SELECT run_id, run_date, predicted_class, count(*) AS n, "
            f"count(in_distribution) AS guarded, count(*) FILTER (WHERE NOT in_distribution) AS ood "
            f"FROM {RESULTS_VIEW} WHERE status = 'ok' AND predicted_class IS NOT NULL AND {where} GROUP BY ALL",
            params,
        ).to_pylist()

        cards: dict[tuple[str, str | None], dict[str, Any]] = {}

        def card_for(key: tuple[str, str | None]) -> dict[str, Any]:
            if key not in cards:
                cards[key] = load_model_card(key[0], self.storage, key[1])
            return cards[key]

        by_run = {r.run_id: r for r in self.runs}
        run_card: dict[str, tuple[str, str | None]] = {}
        for row in counts:
            rid = row["run_id"]
            if rid in run_card:
                continue
            if model:
                key = (model, None)
            else:
                run = by_run.get(rid)
                if run is None or not run.model_uri:
                    raise QueryError(f"cannot find the model card for run {rid}: its record in the table history "
                                     f"has no 'model_uri'; pass --model <package or model folder URI>")
                key = (run.model_uri, run.model_version)
            card_for(key)
            run_card[rid] = key

        # observed counts per (day, card)
        observed: dict[tuple[str, tuple[str, str | None]], dict[str, int]] = {}
        guarded: dict[tuple[str, tuple[str, str | None]], list[int]] = {}
        for row in counts:
            k = (row["run_date"], run_card[row["run_id"]])
            observed.setdefault(k, {})
            observed[k][row["predicted_class"]] = observed[k].get(row["predicted_class"], 0) + int(row["n"])
            g = guarded.setdefault(k, [0, 0])
            g[0] += int(row["guarded"])
            g[1] += int(row["ood"])

        if not cards and model:
            card_for((model, None))
        all_classes: list[str] = []
        for card in cards.values():
            all_classes += list(card["_training"].keys())
        for obs in observed.values():
            all_classes += list(obs.keys())
        classes = list(OrderedDict.fromkeys(all_classes)) or list(CLASSES)
        ordered = _sort_classes(classes)
        if all(c in CLASSES for c in classes):
            classes = ordered

        rows: list[dict[str, Any]] = []
        for key, card in sorted(cards.items(), key=lambda kv: (str(kv[1].get("name")), str(kv[1].get("version")))):
            train = card["_training"]
            total = sum(train.values())
            row = {"source": "training", "run_date": None, "model": _card_label(card), "n": total}
            row.update({c: (train.get(c, 0) / total if total else None) for c in classes})
            row.update(tv_distance=None, chi2=None, p_value=None,
                       ood_rate=(card.get("ood") or {}).get("val_flagged_fraction"))
            rows.append(row)
        for (day, key), obs in sorted(observed.items(), key=lambda kv: (kv[0][0], _card_label(card_for(kv[0][1])))):
            card = card_for(key)
            train = card["_training"]
            n = sum(obs.values())
            total = sum(train.values())
            p = {c: obs.get(c, 0) / n for c in classes}
            q = {c: train.get(c, 0) / total for c in classes}
            tv = 0.5 * sum(abs(p[c] - q[c]) for c in classes)
            chi2, pval = _chi_square([obs.get(c, 0) for c in classes], [q[c] for c in classes])
            row = {"source": "scored", "run_date": day, "model": _card_label(card), "n": n}
            row.update(p)
            g = guarded[(day, key)]
            row.update(tv_distance=tv, chi2=chi2, p_value=pval, ood_rate=g[1] / g[0] if g[0] else None)
            rows.append(row)
        schema = pa.schema(
            [("source", pa.string()), ("run_date", pa.string()), ("model", pa.string()), ("n", pa.int64())]
            + [(c, pa.float64()) for c in classes]
            + [("tv_distance", pa.float64()), ("chi2", pa.float64()), ("p_value", pa.float64()),
               ("ood_rate", pa.float64())]
        )
        table = pa.Table.from_pylist(rows, schema=schema)
        if plot:
            plot_class_mix(table, plot, self.storage)
        return table


def _card_label(card: dict[str, Any]) -> str:
    return f"{card.get('name', '?')}:{card.get('version', '?')}"


def _chi_square(observed: list[int], expected_props: list[float]) -> tuple[float, float]:
    """Pearson chi-square goodness of fit of counts to proportions. A class the model never saw in training
    (expected 0) but observed gives chi2=inf, p=0; classes expected 0 and observed 0 are left out of df."""
    from scipy.stats import chi2 as chi2_dist

    n = sum(observed)
    stat, k = 0.0, 0
    for o, q in zip(observed, expected_props):
        e = n * q
        if e > 0:
            stat += (o - e) ** 2 / e
            k += 1
        elif o > 0:
            return math.inf, 0.0
    if k < 2:
        return stat, 1.0
    return float(stat), float(chi2_dist.sf(stat, k - 1))


def load_model_card(model_uri: str, options: StorageOptions | None = None,
                    version: str | None = None) -> dict[str, Any]:
    """Read model_card.json from a package folder, or from `<model folder>/<version or LATEST>/`.
    Adds "_training": {class: count} (from "class_counts", ordered as "classes")."""
    model_uri = model_uri.rstrip("/")
    tried = []

    def attempt(uri: str) -> dict[str, Any] | None:
        tried.append(uri)
        try:
            return storage.read_json(uri, options)
        except storage.StorageError as err:
            if "does not exist" in str(err) or "access denied" in str(err):
                raise QueryError(f"cannot read the model card: {err}") from None
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise QueryError(f"model card {uri} is not valid JSON: {err}") from None

    card = attempt(storage.join(model_uri, "model_card.json"))
    if card is None and version:
        card = attempt(storage.join(model_uri, version, "model_card.json"))
    if card is None:
        latest_uri = storage.join(model_uri, "LATEST")
        try:
            latest = storage.read_bytes(latest_uri, options).decode().strip()
        except storage.StorageError:
            latest = None
        if latest:
            card = attempt(storage.join(model_uri, latest, "model_card.json"))
    if card is None:
        raise QueryError(f"no model card found for {model_uri} (tried {', '.join(tried)}); "
                         f"expected a package folder with model_card.json or a model folder with LATEST")
    counts = card.get("class_counts")
    if not isinstance(counts, dict) or not counts:
        raise QueryError(f"model card {tried[-1]} has no 'class_counts' (the training class distribution)")
    classes = card.get("classes") or list(counts)
    training = OrderedDict((c, int(counts.get(c, 0))) for c in classes)
    for c, v in counts.items():
        training.setdefault(c, int(v))
    if sum(training.values()) <= 0:
        raise QueryError(f"model card {tried[-1]} has all-zero 'class_counts'")
    card["_training"] = training
    card["_uri"] = tried[-1]
    return card


# ----------------------------------------------------------------------------------------------------------------
# output


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


def plot_class_mix(drift_table: pa.Table, path: str, storage_options: StorageOptions | None = None) -> str:
    """Stacked bars of the class proportions per day (from `Results.drift`), the training mix as the first bar(s).
    Written as PNG to `path`: a local file (parent folders created) or an s3:// URI (written with `storage_options`).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    meta = {"source", "run_date", "model", "n", "tv_distance", "chi2", "p_value"}
    classes = [c for c in drift_table.schema.names if c not in meta]
    rows = drift_table.to_pylist()
    if not rows:
        raise QueryError("nothing to plot: no scored days in the selected range")
    multi_model = len({r["model"] for r in rows}) > 1
    labels = []
    for r in rows:
        version = str(r["model"]).rsplit(":", 1)[-1]
        if r["source"] == "training":
            labels.append(f"training\n{version}")
        else:
            labels.append(f"{r['run_date']}\n" + (f"{version} " if multi_model else "") + f"n={r['n']}")
    n_train = sum(r["source"] == "training" for r in rows)
    fig = Figure(figsize=(max(6.0, 0.9 * len(rows) + 2.5), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    xs = [i + (0.5 if i >= n_train else 0.0) for i in range(len(rows))]  # a gap after the training bar(s)
    if 0 < n_train < len(rows):
        ax.axvline(n_train - 0.25, color="grey", linestyle=":", linewidth=1)
    bottom = [0.0] * len(rows)
    cmap = matplotlib.colormaps["tab10"]
    for i, c in enumerate(classes):
        vals = [r[c] or 0.0 for r in rows]
        ax.bar(xs, vals, bottom=bottom, label=c, color=cmap(i % 10),
               edgecolor=["black" if r["source"] == "training" else "none" for r in rows])
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, r in zip(xs, rows):
        if r["tv_distance"] is not None:
            ax.text(x, 1.01, f"TV {r['tv_distance']:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs)
    many = len(rows) > 10
    ax.set_xticklabels(labels, rotation=45 if many else 0, ha="right" if many else "center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("proportion of ok predictions")
    ax.set_title("Predicted class mix per day vs training distribution")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if storage.is_remote(path):
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        storage.write_bytes(path, buf.getvalue(), storage_options)
        return path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    return path

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

Every report returns a `pyarrow.Table`; `Results.to_pandas(table_or_sql)` gives a pandas frame. The reports are
`leukray.report` (summary, review, errors, runs; text output) and `leukray.drift`; this module is the engine: the
table at a version, its files as one Arrow dataset, the DuckDB view, SQL with errors that name what is wrong.
Nothing here imports torch.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from . import results, results_history
from .config import StorageOptions
from .results import RESULTS_SCHEMA, prob_column
from .results_history import Run

__all__ = [
    "QueryError",
    "NoRunsError",
    "Results",
    "Run",
    "RESULTS_SCHEMA",
    "RESULTS_VIEW",
    "prob_column",
]

RESULTS_VIEW = "results"
"""Name of the DuckDB view over all committed rows."""


_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class QueryError(ValueError):
    """A query or report cannot run; the message says what is wrong and where (location, SQL, file)."""


class NoRunsError(QueryError):
    """The output location holds no committed scoring run."""


class LegacyLayoutError(QueryError):
    """The output location holds results in the previous layout; the message names the conversion command."""


# ----------------------------------------------------------------------------------------------------------------
# helpers


def check_date(value: str | _dt.date | None, name: str) -> str | None:
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


def date_where(since: str | None, until: str | None, column: str = "run_date") -> tuple[str, list[Any]]:
    """SQL condition (without WHERE) and parameters for the run_date window; 'TRUE' when unbounded."""
    conds, params = [], []
    if since:
        conds.append(f"{column} >= ?")
        params.append(since)
    if until:
        conds.append(f"{column} <= ?")
        params.append(until)
    return (" AND ".join(conds) or "TRUE"), params


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


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
            runs = results_history.runs(self.table)
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

    # -- reports (leukray.report, leukray.drift) -------------------------------------------------------------

    def summary(self, since: str | _dt.date | None = None, until: str | _dt.date | None = None,
                by: str = "run") -> pa.Table:
        """Per run or per day: files, ok, errors, needs_review, counts per predicted class, mean confidence."""
        from .report import summary

        return summary(self, since, until, by)

    def review(self, since: str | _dt.date | None = None, until: str | _dt.date | None = None,
               limit: int | None = 100, max_confidence: float | None = None, reason: str | None = None,
               include_reviewed: bool = False) -> pa.Table:
        """The needs-review queue, lowest confidence first; rows a reviewer has decided (`leukray review import`)
        are left out unless `include_reviewed`."""
        from .report import review

        return review(self, since, until, limit, max_confidence, reason, include_reviewed)

    def errors(self, since: str | _dt.date | None = None, until: str | _dt.date | None = None,
               examples: int = 3) -> pa.Table:
        """Failed rows grouped by error message, most frequent first."""
        from .report import errors

        return errors(self, since, until, examples)

    def run_table(self, since: str | _dt.date | None = None, until: str | _dt.date | None = None) -> pa.Table:
        """The scoring runs recorded in the table's history, oldest first."""
        from .report import run_table

        return run_table(self, since, until)

    def drift(self, since: str | _dt.date | None = None, until: str | _dt.date | None = None,
              model: str | None = None, plot: str | None = None, group_by: str | None = None) -> pa.Table:
        """Class mix per day against the training distribution of the model card (`leukray.drift.drift`)."""
        from .drift import drift

        return drift(self, since, until, model, plot, group_by)

    def model_card(self, model_uri: str, version: str | None = None) -> dict[str, Any]:
        """The model card of a package folder or a model folder (`version`, else LATEST)."""
        from .drift import load_model_card

        return load_model_card(model_uri, self.storage, version)


"""The scoring results table: a Delta Lake table at the scoring `output` (local folder or s3://), torch-free.

The one module that knows the table: its schema, how Ray Data workers write its data files, how a run commits them
(atomically, progressively, safely against a concurrent run), how readers open it (latest or as of a version or a
time). The runs recorded in its history, the vacuum of stray files and the one-shot conversion of an output
written in the previous layout (`results/` + `_runs/`) are `leukray.results_history`. `leukray.score` writes
through these two modules, `leukray.query` reads through them.

Layout (docs/architecture.md, "Scoring output"):

    <output>/_delta_log/00000000000000000000.json …        the transaction log: the only source of truth
    <output>/run_date=YYYY-MM-DD/part-<run_id>-<uuid>-<n>.parquet   data files (hive-style partition folders)

A data file is part of the table only once a commit in `_delta_log/` adds it. Every commit made by a scoring run
carries the run's record under the commit-info key "leukray" (run id, model, config with secrets masked, counts,
timings, execution, status); `results_history.runs()` reads them back from the table history. Any Delta reader (Spark, Trino,
Databricks, Polars, DuckDB's delta extension, deltalake) sees the same committed rows; plain-Parquet readers of the
folder do not know which files are committed and must not be used.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import re
import time
import uuid
from typing import Any

import pyarrow as pa

from . import CLASSES, storage
from .config import StorageOptions

PARTITION = "run_date"
RUN_KEY = "leukray"
"""Commit-info key under which a scoring run records itself in every commit it makes."""
CONVERT_COMMAND = "leukray score --convert-legacy {output}"
"""The one-shot conversion of an output in the previous layout (named by every error about one)."""
LOG_RETENTION = "interval 3650 days"
"""`delta.logRetentionDuration` of new tables: the log (and with it time travel and the runs' records) is kept ten
years instead of Delta's default 30 days."""


def prob_column(class_name: str) -> str:
    """'Early Pre-B' → 'prob_early_pre_b' (the scoring output's probability column for a class)."""
    return "prob_" + re.sub(r"[^0-9a-z]+", "_", class_name.lower()).strip("_")


RESULTS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("source_version", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("predicted_class", pa.string()),
        ("confidence", pa.float64()),
        *[(prob_column(c), pa.float64()) for c in CLASSES],
        ("needs_review", pa.bool_()),
        ("ood_score", pa.float64()),
        ("in_distribution", pa.bool_()),
        ("review_reason", pa.string()),
        ("ood_check", pa.string()),  # which of the guard's checks flagged the row (knn, optics, colour, structure)
        ("views", pa.int32()),  # forward passes (test-time views) the row's image took; null on error
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        (PARTITION, pa.string()),
    ]
)
"""The documented row schema (docs/scoring.md): THE definition, used by scoring, queries and conversion. `run_date`
is the table's partition column (in the data file's folder and the log, not inside the Parquet file)."""

FILE_SCHEMA = pa.schema([f for f in RESULTS_SCHEMA if f.name != PARTITION])
"""Columns of the scoring actor's output rows and of each data file."""

KEY_COLUMNS = ["path", "source_version", "model_name", "model_version"]
"""What incremental scoring and the concurrent-run check read (column projection: no probabilities)."""


class ResultsError(ValueError):
    """The results table cannot be read or written; the message says what and where."""


class NoRunsError(ResultsError):
    """The output location holds no results table (no scoring run committed there yet)."""


class LegacyLayoutError(ResultsError):
    """The output location holds results in the previous layout (results/ + _runs/): convert it once."""


class ConcurrentRunError(ResultsError):
    """Another run committed rows for files of this run while it was scoring; this run stopped committing."""


# ------------------------------------------------------------------------------------------------ locations
def table_uri(output: str) -> str:
    """The URI deltalake is given: s3://bucket/prefix, or an absolute local path."""
    output = str(output).rstrip("/") or str(output)
    if storage.is_remote(output):
        return "s3://" + output.split("://", 1)[1].rstrip("/")
    return storage.filesystem(output)[1]


def delta_storage_options(output: str, opts: StorageOptions | None = None,
                          extra: dict[str, str] | None = None) -> dict[str, str] | None:
    """deltalake (object_store) options for `output`: endpoint, region, credentials when configured (else the
    environment's, which delta-rs reads itself), and `conditional_put: etag` so that a commit is a put-if-absent of
    the next log entry: two writers can never both take one version (S3 since 2024, MinIO, Ceph, moto). A store
    without conditional put needs a commit lock instead: pass `AWS_S3_LOCKING_PROVIDER: dynamodb` (and
    `DELTA_DYNAMO_TABLE_NAME`) with `conditional_put: none` through ScoreConfig.delta_options."""
    if not storage.is_remote(output):
        return dict(extra) if extra else None
    kw = storage.s3_kwargs(opts)
    out: dict[str, str] = {"conditional_put": "etag"}
    endpoint = kw.get("endpoint_url")
    if endpoint:
        out["AWS_ENDPOINT_URL"] = endpoint.rstrip("/")
        if endpoint.startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    region = kw.get("client_kwargs", {}).get("region_name")
    out["AWS_REGION"] = region or "us-east-1"
    if "key" in kw:
        out["AWS_ACCESS_KEY_ID"] = kw["key"]
    if "secret" in kw:
        out["AWS_SECRET_ACCESS_KEY"] = kw["secret"]
    if kw.get("anon"):
        out["AWS_SKIP_SIGNATURE"] = "true"
    if extra:
        out.update({k: str(v) for k, v in extra.items()})
    return out


def _exists(output: str, opts: StorageOptions | None, *parts: str) -> bool:
    fs, root = storage.filesystem(output, opts)
    path = posixpath.join(root, *parts) if storage.is_remote(output) else os.path.join(root, *parts)
    fs.invalidate_cache()
    try:
        return fs.exists(path)
    except PermissionError as err:
        raise storage.StorageError(f"access denied reading {output}: {err}") from None


def is_table(output: str, opts: StorageOptions | None = None) -> bool:
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(table_uri(output), storage_options=delta_storage_options(output, opts))


def is_legacy(output: str, opts: StorageOptions | None = None) -> bool:
    """True when `output` holds the previous layout (a `_runs/` folder of manifests or a `results/` folder)."""
    return _exists(output, opts, "_runs") or _exists(output, opts, "results")


def legacy_message(output: str) -> str:
    return (f"{output} holds scoring results in the previous layout (results/ + _runs/ manifests), which leukray no "
            f"longer reads or writes; convert it once into a Delta table (rows and run records are kept) with: "
            f"{CONVERT_COMMAND.format(output=output)}")


def check_location(output: str, opts: StorageOptions | None = None) -> bool:
    """Raise LegacyLayoutError for an output in the previous layout (not yet converted); True when a table
    exists. A missing bucket is a StorageError naming it."""
    if storage.is_remote(output):
        fs, root = storage.filesystem(output, opts)
        storage.check_bucket(fs, root, output)
    if is_table(output, opts):
        if _exists(output, opts, "_runs"):  # a conversion that stopped half way
            raise LegacyLayoutError(legacy_message(output) + " (a conversion was started but did not finish: "
                                    "run the same command again to complete it)")
        return True
    if is_legacy(output, opts):
        raise LegacyLayoutError(legacy_message(output))
    return False


# ------------------------------------------------------------------------------------------------ reading
def parse_as_of(value: int | str | dt.datetime | None) -> int | dt.datetime | None:
    """`--as-of`: a table version (integer) or a time (ISO 8601; a date means its 00:00 UTC; naive = UTC)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ResultsError(f"as_of must be a version or a timestamp, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ResultsError(f"as_of version must be >= 0, got {value}")
        return value
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    text = str(value).strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ResultsError(f"as_of must be a table version (e.g. 12) or a timestamp (e.g. 2026-11-28T06:00:00Z "
                           f"or 2026-11-28), got {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def open_table(output: str, opts: StorageOptions | None = None, as_of: int | str | dt.datetime | None = None):
    """The DeltaTable at `output` (latest, or as of a version / a time). Clear errors for no table, the previous
    layout, a version that does not exist and a time before the table's first commit."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    when = parse_as_of(as_of)
    if not check_location(output, opts):
        raise NoRunsError(f"no scoring runs found under {output} (no Delta table: expected "
                          f"{storage.join(output, '_delta_log')}/)")
    uri, so = table_uri(output), delta_storage_options(output, opts)
    try:
        table = DeltaTable(uri, storage_options=so)
        if when is None:
            return table
        if isinstance(when, int):
            latest = table.version()
            if when > latest:
                raise ResultsError(f"{output} has no version {when} (latest: {latest})")
            table.load_as_version(when)
            return table
        # by the commits' own timestamps (commitInfo, the writer's clock): deltalake would use the log files'
        # modification times, which an object store sets on upload or copy
        stamps = sorted((int(h["timestamp"]), int(h["version"])) for h in table.history() if "timestamp" in h)
        limit = int(when.timestamp() * 1000)
        before = [v for ts, v in stamps if ts <= limit]
        if not before:
            first = dt.datetime.fromtimestamp(stamps[0][0] / 1000, dt.timezone.utc) if stamps else None
            raise ResultsError(f"{output} did not exist yet at {when.isoformat()}"
                               + (f" (first commit: {first.isoformat()})" if first else ""))
        table.load_as_version(max(before))
        return table
    except TableNotFoundError:
        raise NoRunsError(f"no scoring runs found under {output}") from None
    except DeltaError as err:
        raise ResultsError(f"cannot open the results table {output}"
                           + (f" as of {as_of}" if as_of is not None else "") + f": {err}") from None


def view_schema(table) -> pa.Schema:
    """RESULTS_SCHEMA (its order, its types) plus any further column the table has: rows of older files without a
    newer column read as null, whatever order columns were added to the table in."""
    have = pa.schema(table.schema().to_arrow())
    extra = [f for f in have if f.name not in RESULTS_SCHEMA.names]
    return pa.schema(list(RESULTS_SCHEMA) + extra)


def dataset(table, output: str, opts: StorageOptions | None = None):
    """A `pyarrow.dataset.Dataset` over exactly the files of `table`'s version, `run_date` from the log, read through
    Arrow's own C++ filesystem (`storage.arrow_filesystem`: no Python callbacks while DuckDB scans it)."""
    import pyarrow.fs as pafs

    fs, root = storage.arrow_filesystem(output, opts)
    return table.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(root, fs), schema=view_schema(table))


def scored_keys(output: str, opts: StorageOptions | None, model_name: str, model_version: str) -> pa.Table:
    """(path, source_version) of the committed rows scored by this model name + version (only those columns are
    read). Empty when there is no table yet."""
    import pyarrow.dataset as pads

    empty = pa.table({"path": pa.array([], pa.string()), "source_version": pa.array([], pa.string())})
    if not check_location(output, opts):
        return empty
    d = dataset(open_table(output, opts), output, opts)
    flt = (pads.field("model_name") == model_name) & (pads.field("model_version") == model_version)
    return d.to_table(columns=["path", "source_version"], filter=flt)


def table_version(output: str, opts: StorageOptions | None, extra: dict[str, str] | None = None) -> int:
    from deltalake import DeltaTable

    return DeltaTable(table_uri(output), storage_options=delta_storage_options(output, opts, extra)).version()


# ------------------------------------------------------------------------------------------------ writing
def ensure_table(output: str, opts: StorageOptions | None = None, extra: dict[str, str] | None = None,
                 schema: pa.Schema = RESULTS_SCHEMA, check: bool = True):
    """Open the table at `output`, creating it (empty, partitioned by run_date) when missing and adding columns of
    `schema` it lacks (nullable: older rows read them as null). Safe when another run does the same at once."""
    from deltalake import DeltaTable, Schema
    from deltalake.exceptions import DeltaError

    if check:
        check_location(output, opts)
    uri, so = table_uri(output), delta_storage_options(output, opts, extra)
    if not storage.is_remote(output):
        os.makedirs(uri, exist_ok=True)
    for attempt in range(10):
        try:
            if not DeltaTable.is_deltatable(uri, storage_options=so):
                DeltaTable.create(uri, Schema.from_arrow(schema), mode="ignore", partition_by=[PARTITION],
                                  name="leukray_scores", description="leukray scoring results (docs/scoring.md)",
                                  configuration={"delta.logRetentionDuration": LOG_RETENTION},
                                  storage_options=so)
            table = DeltaTable(uri, storage_options=so)
            if table.metadata().partition_columns != [PARTITION]:
                raise ResultsError(f"{output} is a Delta table partitioned by {table.metadata().partition_columns}, "
                                   f"not by {PARTITION}: not a leukray results table")
            have = set(pa.schema(table.schema().to_arrow()).names)
            missing = [f.with_nullable(True) for f in schema if f.name not in have]
            if missing:
                table.alter.add_columns(Schema.from_arrow(pa.schema(missing)).fields)
                table = DeltaTable(uri, storage_options=so)
            return table
        except DeltaError as err:  # another writer created or altered it between our read and our commit
            if attempt == 9:
                raise ResultsError(f"cannot create or update the results table {output}: {err}") from None
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


ACTION_SCHEMA = pa.schema([("file", pa.string()), ("bytes", pa.int64()), ("rows", pa.int64()),
                           ("ok", pa.int64()), (PARTITION, pa.string()), ("modified_ms", pa.int64())])
"""What a worker returns for each data file it wrote (the only thing that reaches the driver)."""


def write_files(rows: pa.Table, output: str, opts: StorageOptions | None, run_id: str, run_date: str) -> pa.Table:
    """Write `rows` (FILE_SCHEMA columns) as one Parquet data file of the table under run_date=…/ and return its
    metadata (ACTION_SCHEMA). Runs on a Ray Data worker; nothing is committed here. A retried task writes a new
    file under a new name; the one it replaces is never committed and is removed by the next vacuum."""
    import pyarrow.dataset as pads

    if rows.num_rows == 0:
        return ACTION_SCHEMA.empty_table()
    names = [n for n in FILE_SCHEMA.names if n in rows.column_names] + \
        [n for n in rows.column_names if n not in RESULTS_SCHEMA.names]
    target = pa.schema([RESULTS_SCHEMA.field(n) if n in RESULTS_SCHEMA.names else rows.schema.field(n) for n in names])
    data = rows.select(names).cast(target)
    data = data.append_column(pa.field(PARTITION, pa.string()), pa.array([run_date] * data.num_rows, pa.string()))
    ok = int(data["status"].to_numpy(zero_copy_only=False).tolist().count("ok")) if "status" in names else 0
    fs, root = storage.arrow_filesystem(output, opts)
    written: list[tuple[str, int, int]] = []
    remote = storage.is_remote(output)

    def visit(wf) -> None:
        written.append((posixpath.relpath(wf.path.lstrip("/"), root.lstrip("/")) if remote
                        else os.path.relpath(wf.path, root).replace(os.sep, "/"), wf.size, wf.metadata.num_rows))

    fmt = pads.ParquetFileFormat()
    pads.write_dataset(data, base_dir=root, filesystem=fs, format=fmt,
                       file_options=fmt.make_write_options(compression="zstd"),
                       partitioning=pads.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive"),
                       basename_template=f"part-{run_id}-{uuid.uuid4().hex[:12]}-{{i}}.parquet",
                       existing_data_behavior="overwrite_or_ignore", file_visitor=visit, create_dir=not remote,
                       max_rows_per_file=0)
    now = int(time.time() * 1000)
    return pa.Table.from_pylist([{"file": f, "bytes": int(size), "rows": int(n), "ok": ok if len(written) == 1 else
                                  None, PARTITION: run_date, "modified_ms": now} for f, size, n in written],
                                schema=ACTION_SCHEMA)


def _add_actions(files: pa.Table):
    from deltalake.transaction import AddAction

    return [AddAction(path=r["file"], size=int(r["bytes"]), partition_values={PARTITION: r[PARTITION]},
                      modification_time=int(r["modified_ms"]), data_change=True,
                      stats=json.dumps({"numRecords": int(r["rows"])})) for r in files.to_pylist()]


class Committer:
    """Commits one run's data files to the table, each commit atomic, with the run's record in its commit info.

    Safe against another run writing the same table at once: every commit is made against the version it checked
    (`max_commit_retries=0`: if another writer took that version, the commit fails and is checked again against the
    newer one), and the check reads the key columns of every file other writers added since the last check. If one
    of them holds a row for a file of this run (same path, source version, model name and version), the run stops
    with ConcurrentRunError before committing anything more: a file is never scored twice into the table."""

    def __init__(self, output: str, opts: StorageOptions | None, run_id: str, model_name: str, model_version: str,
                 todo: pa.Table | None, extra: dict[str, str] | None = None, table=None):
        self.output, self.opts, self.run_id = output, opts, run_id
        self.model_name, self.model_version = model_name, model_version
        self.uri, self.so = table_uri(output), delta_storage_options(output, opts, extra)
        self.todo = (todo.select(["path", "source_version"]).group_by(["path", "source_version"]).aggregate([])
                     if todo is not None and todo.num_rows else None)
        table = table if table is not None else ensure_table(output, opts, extra)
        self.known = self._files(table)
        self.commits = 0
        self.versions: list[int] = []

    @staticmethod
    def _files(table) -> set[str]:
        return set(table.get_add_actions(flatten=True).column("path").to_pylist()) if table.version() >= 0 else set()

    def _check(self, table) -> None:
        """Rows of this run's model for this run's files in files other writers added since the last check?"""
        import pyarrow.dataset as pads

        current = self._files(table)
        new = sorted(current - self.known)
        if new and self.todo is not None:
            fs, root = storage.arrow_filesystem(self.output, self.opts)
            join = posixpath.join if storage.is_remote(self.output) else os.path.join
            d = pads.dataset([join(root, f) for f in new], filesystem=fs, format="parquet")
            keys = d.to_table(columns=KEY_COLUMNS + ["run_id"],
                              filter=(pads.field("model_name") == self.model_name)
                              & (pads.field("model_version") == self.model_version))
            clash = keys.join(self.todo, keys=["path", "source_version"], join_type="inner")
            if clash.num_rows:
                others = sorted(set(clash["run_id"].to_pylist()))
                raise ConcurrentRunError(
                    f"run {self.run_id}: another scoring run ({', '.join(others)}) committed rows for "
                    f"{clash.num_rows} of this run's files to {self.output} while this run was scoring (e.g. "
                    f"{clash['path'][0].as_py()}), with the same model {self.model_name} {self.model_version}. "
                    f"This run stops without committing its remaining rows, so that no file has two rows; what it "
                    f"committed before stays. Run it again to score what is still missing.")
        self.known = current

    def commit(self, files: pa.Table, record: dict[str, Any]) -> int:
        """Commit `files` (ACTION_SCHEMA rows; may be empty: then the commit only records the run). Returns the
        version it became."""
        from deltalake import DeltaTable
        from deltalake.exceptions import CommitFailedError, DeltaError
        from deltalake.transaction import CommitProperties

        actions = _add_actions(files)
        last: Exception | None = None
        for attempt in range(40):
            table = DeltaTable(self.uri, storage_options=self.so)
            self._check(table)
            version = table.version() + 1
            rec = dict(record, commit=self.commits + 1)
            try:
                table.create_write_transaction(
                    actions, "append", pa.schema(table.schema().to_arrow()), partition_by=[PARTITION],
                    commit_properties=CommitProperties(custom_metadata={RUN_KEY: rec}, max_commit_retries=0))
            except CommitFailedError as err:  # another writer took `version`: check its files, try the next one
                last = err
                time.sleep(min(2.0, 0.05 * (attempt + 1)))
                continue
            except DeltaError as err:
                raise ResultsError(f"run {self.run_id}: cannot commit to {self.output}: {err}") from None
            self.known |= {a.path for a in actions}
            self.commits += 1
            self.versions.append(version)
            return version
        raise ResultsError(f"run {self.run_id}: could not commit to {self.output} after 40 attempts "
                           f"(other writers kept committing first): {last}")


# The table's history (its runs), the vacuum and the conversion of the previous layout: leukray.results_history.
from .results_history import convert_legacy, vacuum  # noqa: E402,F401  (scoring calls them through here)

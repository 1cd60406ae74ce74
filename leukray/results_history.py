"""The results table's history: the scoring runs recorded in its commits, the vacuum of files no commit references,
and the one-shot conversion of an output written in the previous layout (`results/` + `_runs/` manifests).

The table itself (schema, locations, reading, worker writes, commits) is `leukray.results`; this module reads its
log and tidies its folder. Torch-free, like the table module: `leukray query` and `leukray report runs` use it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from . import storage
from .config import StorageOptions
from .results import (ACTION_SCHEMA, FILE_SCHEMA, PARTITION, RUN_KEY, Committer, ResultsError, _exists,
                      check_location, delta_storage_options, ensure_table, is_table, table_uri, table_version,
                      write_files)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ runs

def history(table) -> list[dict[str, Any]]:
    """The commit infos of `table` up to its loaded version, each with its "version". (deltalake 1.6's history()
    of a table loaded at an older version lists the whole log but numbers it from the loaded version down, so it is
    read from the latest version and cut.)"""
    from deltalake import DeltaTable

    upto = table.version()
    latest = DeltaTable(table.table_uri, storage_options=getattr(table, "_storage_options", None))
    return [h for h in latest.history() if h.get("version", 0) <= upto]


@dataclass
class Run:
    """One scoring run as recorded in the commits it made (the last one's record wins)."""

    run_id: str
    run_date: str | None
    status: str
    versions: list[int]
    committed_at: dt.datetime | None
    model_uri: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return int(self.raw.get("rows") or 0)


def runs(table) -> list[Run]:
    """The scoring runs recorded in `table`'s history up to its loaded version, oldest first."""
    by_id: dict[str, Run] = {}
    for h in sorted(history(table), key=lambda h: h.get("version", 0)):
        rec = h.get(RUN_KEY)
        if isinstance(rec, str):
            try:
                rec = json.loads(rec)
            except json.JSONDecodeError:
                continue
        if not isinstance(rec, dict) or not rec.get("run_id"):
            continue
        when = dt.datetime.fromtimestamp(h["timestamp"] / 1000, dt.timezone.utc) if "timestamp" in h else None
        run = by_id.get(rec["run_id"])
        if run is None:
            run = by_id[rec["run_id"]] = Run(run_id=rec["run_id"], run_date=None, status="", versions=[],
                                             committed_at=None)
        run.versions.append(int(h.get("version", -1)))
        run.run_date, run.status, run.committed_at = rec.get("run_date"), str(rec.get("status") or ""), when
        run.model_uri, run.model_name = rec.get("model_uri"), rec.get("model_name")
        run.model_version, run.raw = rec.get("model_version"), rec
    return sorted(by_id.values(), key=lambda r: (min(r.versions), r.run_id))


# ------------------------------------------------------------------------------------------------ vacuum
def vacuum(output: str, opts: StorageOptions | None, retention_hours: float, extra: dict[str, str] | None = None,
           dry_run: bool = False) -> list[str]:
    """Delete files under the table that no commit references (those of runs that died before committing them, or
    of retried worker tasks) and that are older than `retention_hours`. The retention must exceed the time between a
    worker writing a file and its run committing it (at most commit_every_minutes plus a file's write time), or a
    vacuum could delete a running run's next files; the default 168 h (Delta's own) leaves ample margin."""
    from deltalake import DeltaTable

    if not check_location(output, opts):
        return []
    table = DeltaTable(table_uri(output), storage_options=delta_storage_options(output, opts, extra))
    hours = max(0, int(retention_hours))
    return list(table.vacuum(retention_hours=hours, dry_run=dry_run, enforce_retention_duration=False, full=True))


# ------------------------------------------------------------------------------------------------ previous layout
def _read_legacy_manifests(output: str, opts: StorageOptions | None) -> list[dict[str, Any]]:
    fs, root = storage.filesystem(output, opts)
    remote = storage.is_remote(output)
    runs_dir = posixpath.join(root, "_runs") if remote else os.path.join(root, "_runs")
    fs.invalidate_cache()
    try:
        names = sorted(p for p in fs.ls(runs_dir, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        names = []
    out = []
    for name in names:
        with fs.open(name, "rb") as f:
            try:
                data = json.loads(f.read())
            except json.JSONDecodeError as err:
                raise ResultsError(f"run manifest {name} is not valid JSON ({err}); fix or remove it, then convert "
                                   f"again") from None
        if not isinstance(data, dict) or not isinstance(data.get("files"), list):
            raise ResultsError(f"run manifest {name} has no 'files' list; fix or remove it, then convert again")
        data.setdefault("run_id", posixpath.basename(name)[: -len(".json")])
        out.append(data)
    return sorted(out, key=lambda m: str(m["run_id"]))


def convert_legacy(output: str, opts: StorageOptions | None = None, extra: dict[str, str] | None = None,
                   log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Convert an output in the previous layout (results/run_date=…/*.parquet committed by _runs/<run_id>.json
    manifests) into the Delta table at the same location: one commit per run, oldest first, its rows (read from the
    files its manifest lists, cast to RESULTS_SCHEMA) in new data files and its manifest (less the file list) as the
    commit's run record. Files no manifest lists (crashed runs) are not converted. Once every run is committed the
    old `results/`, `_staging/` and `_runs/` are removed (manifests last). Stopped half way, the same call resumes:
    runs already in the table are skipped."""
    import pyarrow.parquet as pq

    fs, root = storage.filesystem(output, opts)
    remote = storage.is_remote(output)
    join = posixpath.join if remote else os.path.join
    manifests = _read_legacy_manifests(output, opts)
    if not manifests and not _exists(output, opts, "results"):
        raise ResultsError(f"{output} holds no results in the previous layout (no {storage.join(output, '_runs')}/)")
    have_table = is_table(output, opts)
    table = ensure_table(output, opts, extra, check=False)
    done = {r.run_id for r in runs(table)} if have_table else set()
    arrow_fs, _ = storage.arrow_filesystem(output, opts)
    committer = Committer(output, opts, "convert", "", "", None, extra, table=table)
    converted, rows_total = [], 0
    for m in manifests:
        run_id = str(m["run_id"])
        if run_id in done:
            log(f"run {run_id}: already in the table, skipped")
            continue
        files = []
        for rel in m["files"]:
            rel = str(rel)
            if "://" in rel:
                rel = rel.split("://", 1)[1]
                files.append(rel if remote else "/" + rel.lstrip("/"))
            elif not remote and os.path.isabs(rel):
                files.append(rel)
            else:
                files.append(join(root, rel))
        actions = []
        rows = 0
        for f in files:
            t = pq.read_table(f, filesystem=arrow_fs)
            run_date = (t[PARTITION][0].as_py() if PARTITION in t.column_names and t.num_rows else None) \
                or m.get("run_date") or _date_in_path(f) or _date_of_run_id(run_id)
            cols = {}
            for fld in FILE_SCHEMA:
                cols[fld.name] = (t[fld.name].cast(fld.type) if fld.name in t.column_names
                                  else pa.nulls(t.num_rows, fld.type))
            for name in t.column_names:  # columns a newer writer added: kept
                if name not in cols and name != PARTITION:
                    cols[name] = t[name]
            data = pa.table(cols)
            if data.num_rows:
                actions.append(write_files(data, output, opts, run_id, run_date))
            rows += data.num_rows
        record = {k: v for k, v in m.items() if k != "files"}
        record.update(run_id=run_id, status=m.get("status") or "committed", rows=rows,
                      converted_from=f"{storage.join(output, '_runs', run_id + '.json')}")
        record.setdefault("run_date", _date_of_run_id(run_id))
        files_table = pa.concat_tables(actions) if actions else ACTION_SCHEMA.empty_table()
        record["files"] = files_table.num_rows
        version = committer.commit(files_table, record)
        log(f"run {run_id}: {rows} rows ({len(files)} file(s)) → version {version}")
        converted.append(run_id)
        rows_total += rows
    # the old layout goes once everything is in the table (manifests last: they mark an unfinished conversion)
    for sub in ("results", "_staging", "_runs"):
        path = join(root, sub)
        fs.invalidate_cache()
        if fs.exists(path):
            fs.rm(path, recursive=True)
    return {"output": output, "converted_runs": converted, "rows": rows_total,
            "skipped_runs": sorted(done & {str(m["run_id"]) for m in manifests}),
            "version": table_version(output, opts, extra)}


def _date_in_path(path: str) -> str | None:
    m = re.search(r"(?:^|/)run_date=(\d{4}-\d{2}-\d{2})(?:/|$)", path)
    return m.group(1) if m else None


def _date_of_run_id(run_id: str) -> str | None:
    m = re.match(r"^(\d{4})(\d{2})(\d{2})T", run_id)
    return f"{m.group(1)}-{m.group(2)}-{m.group(3)}" if m else None

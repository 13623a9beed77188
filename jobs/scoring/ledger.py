"""Exactly-once bookkeeping: run folders, manifests, and what is already scored.

Layout under ``--output`` (local folder or ``s3://`` prefix)::

    run_date=2025-01-31/run_id=20250131T020000Z-1a2b3c4d/part-00000.parquet
    _manifests/20250131T020000Z-1a2b3c4d.json

A run writes its Parquet files into its own ``run_id=`` folder (a fresh folder per run,
so Ray's or pyarrow's append-vs-overwrite never matters), then writes its manifest LAST,
atomically (a local rename or one S3 PUT). The manifest lists the run's files and counts.

Rules every reader follows (``jobs/report.py`` and the rerun skip logic do):

* Only runs with a manifest exist. A ``run_id=`` folder without one is a run that died or
  is still writing; it is ignored, and the next run deletes it (one scoring job per output
  at a time: a second concurrent job would delete the first one's folder).
* Only the files a manifest lists are read (stray files are ignored).
* The visible row for a key ``(image_uri, frame, model_version)`` is the one from the
  latest completed run (largest ``run_id``; run ids sort by start time). A ``--rescore-all``
  run therefore supersedes every earlier row, and a rerun's fixed row supersedes the
  earlier error row. ``LATEST_VIEW_SQL`` is that view in SQL.

A rerun skips a frame whose visible row has the same model_version and content_sha256
and is ``ok`` or a deterministic decode error; rows with a transient error (the model
call failed) are scored again. Killing a run at any point therefore loses nothing
(no manifest: all its frames are still "not scored") and duplicates nothing.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from adcore import storage
from jobs.scoring.schema import STATUS_ERROR, STATUS_OK, TRANSIENT_ERROR_KINDS, error_kind

log = logging.getLogger(__name__)

MANIFESTS = "_manifests"
MANIFEST_FORMAT = "adcore-score-run/1"

# The view readers query: one row per key, from the latest completed run (table `scores`
# holds the rows of every completed run's listed files).
LATEST_VIEW_SQL = """
CREATE OR REPLACE VIEW latest AS
SELECT * EXCLUDE (_rank) FROM (
    SELECT *, row_number() OVER (
        PARTITION BY image_uri, frame, model_version ORDER BY run_id DESC
    ) AS _rank
    FROM scores
) WHERE _rank = 1
"""


def run_dir(output: str, run_date: str, run_id: str) -> str:
    return storage.join(output, f"run_date={run_date}", f"run_id={run_id}")


def manifest_uri(output: str, run_id: str) -> str:
    return storage.join(output, MANIFESTS, f"{run_id}.json")


def completed_runs(output: str) -> list[dict]:
    """Manifests of every completed run under ``output``, oldest first."""
    uri = storage.join(output, MANIFESTS)
    if not storage.exists(uri):
        return []
    out = []
    for m in storage.list_files(uri, suffixes=[".json"], recursive=False):
        try:
            manifest = json.loads(storage.read_bytes(m))
        except (ValueError, OSError) as e:
            raise ValueError(f"unreadable run manifest {m}: {e}") from None
        if manifest.get("format") == MANIFEST_FORMAT:
            out.append(manifest)
    return sorted(out, key=lambda m: m["run_id"])


def run_files(output: str, manifest: dict) -> list[str]:
    """Full URIs of the Parquet files a manifest lists."""
    return [storage.join(output, rel) for rel in manifest["files"]]


def write_manifest(output: str, manifest: dict) -> str:
    """Commit a run: after this, readers see its files."""
    uri = manifest_uri(output, manifest["run_id"])
    storage.write_bytes(uri, json.dumps({"format": MANIFEST_FORMAT, **manifest}, indent=1).encode())
    return uri


def incomplete_run_dirs(output: str, completed_ids: set[str]) -> list[str]:
    """``run_id=`` folders that have no manifest."""
    fs, base = storage.filesystem_for(output)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return []
    found = set()
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        parts = posixpath.relpath(info.path, base).split("/")
        if len(parts) >= 2 and parts[0].startswith("run_date=") and parts[1].startswith("run_id="):
            if parts[1][len("run_id=") :] not in completed_ids:
                found.add(posixpath.join(base, parts[0], parts[1]))
    prefix = storage.S3_PREFIX if storage.is_s3(output) else ""
    return sorted(prefix + p for p in found)


def cleanup_incomplete(output: str, completed_ids: set[str]) -> list[str]:
    """Delete the folders of runs that never completed; returns what was removed."""
    removed = incomplete_run_dirs(output, completed_ids)
    for uri in removed:
        fs, path = storage.filesystem_for(uri)
        fs.delete_dir(path)
        log.info("removed incomplete run folder %s", uri)
    return removed


def read_runs(output: str, manifests: list[dict], columns: list[str] | None = None) -> pa.Table | None:
    """The rows of the given completed runs (None if they hold no file)."""
    files = [f for m in manifests for f in run_files(output, m)]
    if not files:
        return None
    fs, _ = storage.filesystem_for(output)
    tables = [pq.read_table(storage.filesystem_for(f)[1], columns=columns, filesystem=fs) for f in files]
    return pa.concat_tables(tables)


def latest_rows(table: pa.Table) -> pa.Table:
    """One row per (image_uri, frame, model_version): the latest run's."""
    import duckdb

    con = duckdb.connect()
    con.register("scores", table)
    con.execute(LATEST_VIEW_SQL)
    return con.sql("SELECT * FROM latest").to_arrow_table()


@dataclass(frozen=True)
class FileState:
    """What completed runs hold for one file under the current model version."""

    sha256: str
    done_frames: frozenset[int]  # frames not to score again (ok, or a deterministic error)
    complete: bool  # every recorded frame is done: skip the file without decoding


def scored_index(output: str, model_version: str) -> dict[str, FileState]:
    """``image_uri -> FileState`` for the visible rows of ``model_version``."""
    manifests = [m for m in completed_runs(output) if m.get("model_version") == model_version]
    cols = ["image_uri", "content_sha256", "frame", "model_version", "status", "error", "run_id"]
    table = read_runs(output, manifests, cols)
    if table is None:
        return {}
    rows = latest_rows(table).to_pylist()
    by_uri: dict[str, list[dict]] = {}
    for r in rows:
        by_uri.setdefault(r["image_uri"], []).append(r)
    index = {}
    for uri, recs in by_uri.items():
        newest = max(recs, key=lambda r: r["run_id"])
        sha = newest["content_sha256"]
        done = frozenset(
            r["frame"]
            for r in recs
            if r["content_sha256"] == sha
            and (
                r["status"] == STATUS_OK
                or (r["status"] == STATUS_ERROR and error_kind(r["error"]) not in TRANSIENT_ERROR_KINDS)
            )
        )
        complete = all(r["frame"] in done for r in recs if r["content_sha256"] == sha)
        index[uri] = FileState(sha, done, complete)
    return index

"""Distributed Parquet writes of a scoring run: write tasks, then the manifest from their results.

Each write task (:meth:`RunSink.write`, on whichever node Ray runs it) writes one file
``part-<task index>.parquet`` into the run's folder, whole or not at all, with the frame count
of each of its files beside it (``.frames.json``): a retried task overwrites its own file. A
run that dies leaves no manifest; the next run commits the files it wrote whole
(``ledger.salvage_incomplete``) and removes the rest. The driver
holds no result rows: tasks return only their file name and counts, and
:meth:`RunSink.on_write_complete` writes the manifest from those (ledger rules apply). With
``--dicom-output`` each task also lists the DICOM objects of its rows in a small file of its own
(``dicom_out.write_object_list``); the manifest names those lists, never the objects one by one.

Rows arrive with ``image_key`` set by the driver for the run's ``--path-privacy`` (the URI, or
its keyed hash: the key never leaves the driver). With ``pseudonymize`` each task nulls
``image_uri``, scrubs the URI from error messages and writes its (``image_key``, ``image_uri``)
pairs under ``--path-map`` (``<path-map>/<run_id>/``), the one place the paths go.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.datasource.datasink import Datasink, WriteResult

from adcore import storage
from jobs.scoring import schema as S
from jobs.scoring.dicom_out import (
    DICOM_COLUMN,
    DICOM_ERROR_COLUMN,
    PACS_SENT_COLUMN,
    PACS_UNSENT_COLUMN,
    SKIPPED_PREFIX,
    write_object_list,
)
from jobs.scoring.stages import FRAMES_COLUMN, NODE_COLUMN, SPLITS_COLUMN, TIME_COLUMN

log = logging.getLogger("jobs.score")

# Rows per write task (and per Parquet row group); 0: one write task per block as it arrives
# (about a model batch), so results reach the store as they are scored and a killed run keeps
# them (``ledger.salvage_incomplete``); compaction folds the small parts into the latest table.
ROWS_PER_WRITE = 0
FRAMES_SUFFIX = ".frames.json"  # beside each part: image key -> frames of its file


def _rows_by_time(times: list[float]) -> list[tuple[float, int]]:
    """(unix seconds, rows) per distinct replica time (one per model batch)."""
    return sorted(Counter(t for t in times if t is not None).items())


class Progress:
    """Counts write tasks report (a Ray actor), for the driver's progress lines."""

    def __init__(self):
        self.rows = self.errors = self.files = 0

    def add(self, rows: int, errors: int, files: int) -> None:
        self.rows += rows
        self.errors += errors
        self.files += files

    def totals(self) -> tuple[int, int, int]:
        return self.rows, self.errors, self.files


class RunSink(Datasink[dict]):
    """Writes a run's rows into its folder; ``on_write_complete`` commits the manifest.

    Args:
        output: The job's ``--output``.
        run_dir: This run's folder under it.
        manifest: The manifest's fields known before the run (counts are added at the end).
        rows_per_write: Rows each write task collects before writing one file.
        progress: A :class:`Progress` actor handle, or None.
        path_privacy: ``keep`` or ``pseudonymize`` (``schema.PATH_PRIVACY``).
        path_map: With ``pseudonymize``: the folder or prefix that receives each run's key -> URI map.
    """

    def __init__(
        self,
        output: str,
        run_dir: str,
        manifest: dict,
        rows_per_write: int = ROWS_PER_WRITE,
        progress: Any = None,
        path_privacy: str = "keep",
        path_map: str = "",
    ):
        if path_privacy not in S.PATH_PRIVACY:
            raise ValueError(f"--path-privacy {path_privacy!r}: expected one of {', '.join(S.PATH_PRIVACY)}")
        self.output, self.run_dir = output, run_dir
        self.path_privacy, self.path_map = path_privacy, path_map
        self.manifest = dict(manifest)
        self.rows_per_write = rows_per_write
        self.progress = progress
        self.t0 = time.time()  # wall clock: write tasks on other nodes report theirs
        self.committed: dict | None = None
        self.files_seen = 0  # files with a frame-0 row in this run (for the final progress line)

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_write or None

    def get_name(self) -> str:
        return "AdcoreRun"

    def write(self, blocks, ctx) -> dict:
        """One task: filter skip markers, write one file, return its name and counts."""
        tables = [pa.table(b) if not isinstance(b, pa.Table) else b for b in blocks]
        table = pa.concat_tables(tables, promote_options="permissive") if tables else None
        result = {
            "file": None,
            "rows": 0,
            "skipped_files": 0,
            "status": {},
            "errors_by_kind": {},
            "rows_by_node": {},
            "files_seen": 0,
            "dicom_rows": 0,
            "dicom_list": None,  # this task's list of its DICOM objects (under the run's DICOM folder), if any
            "dicom_seg": 0,  # DICOM-SEG objects written for these rows
            "dicom_sr": 0,  # DICOM SR objects written for these rows
            "dicom_failed": {},  # instances whose DICOM objects were not written, by reason
            "dicom_skipped": {},  # instances that are no image a SEG references, by SOP class
            "pacs_sent": 0,  # objects stored in the PACS (--pacs-url)
            "pacs_unsent": 0,  # objects the PACS did not take (named in this task's list, for the next run)
            "scored": [],  # (unix seconds, rows): one entry per model batch
            "oom_splits": 0,  # model calls split in two after a device out-of-memory error
        }
        if table is None or table.num_rows == 0:
            return result
        if SPLITS_COLUMN in table.column_names:  # counted before skip markers (which may carry them) go
            result["oom_splits"] = int(pc.sum(table.column(SPLITS_COLUMN)).as_py() or 0)
            table = table.drop_columns([SPLITS_COLUMN])
        skipped = pc.equal(table.column("status"), S.STATUS_SKIPPED)
        result["skipped_files"] = int(pc.sum(skipped).as_py() or 0)
        table = table.filter(pc.invert(skipped))
        nodes = table.column(NODE_COLUMN).to_pylist()
        scored = _rows_by_time(table.column(TIME_COLUMN).to_pylist())

        objects, unsent = [], []
        if DICOM_COLUMN in table.column_names:  # --dicom-output: counted here, never written to Parquet
            objects = [p for ps in table.column(DICOM_COLUMN).to_pylist() for p in ps or ()]
            reasons = [e for e in table.column(DICOM_ERROR_COLUMN).to_pylist() if e]
            result["dicom_failed"] = dict(Counter(e for e in reasons if not e.startswith(SKIPPED_PREFIX)))
            skipped = [e[len(SKIPPED_PREFIX) :] for e in reasons if e.startswith(SKIPPED_PREFIX)]
            result["dicom_skipped"] = dict(Counter(skipped))
            table = table.drop_columns([DICOM_COLUMN, DICOM_ERROR_COLUMN])
        if PACS_SENT_COLUMN in table.column_names:
            result["pacs_sent"] = int(pc.sum(table.column(PACS_SENT_COLUMN)).as_py() or 0)
            unsent = [p for ps in table.column(PACS_UNSENT_COLUMN).to_pylist() for p in ps or ()]
            table = table.drop_columns([PACS_SENT_COLUMN, PACS_UNSENT_COLUMN])
        if objects or unsent:  # the task lists its own objects: the driver only learns the list's name
            result["dicom_list"] = write_object_list(self.manifest["dicom_output"], ctx.task_idx, objects, unsent)
            result["dicom_seg"] = sum(p.endswith(".seg.dcm") for p in objects)
            result["dicom_sr"] = sum(p.endswith(".sr.dcm") for p in objects)
            result["pacs_unsent"] = len(unsent)
        frames = {}  # image key -> frames of its file: which files this part holds whole (a dead run's salvage)
        if FRAMES_COLUMN in table.column_names:
            frames = dict(zip(table.column("image_key").to_pylist(), table.column(FRAMES_COLUMN).to_pylist()))
            table = table.drop_columns([FRAMES_COLUMN])
        table = table.drop_columns([NODE_COLUMN, TIME_COLUMN])
        if table.num_rows:
            table = self._identify(table, ctx.task_idx)
        table = table.select(S.SCHEMA.names).cast(S.SCHEMA)
        if table.num_rows:
            name = f"part-{ctx.task_idx:05d}.parquet"
            if frames:  # first: a part present has its frame counts beside it
                storage.write_bytes(storage.join(self.run_dir, name + FRAMES_SUFFIX), json.dumps(frames).encode())
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf, compression="zstd", row_group_size=max(table.num_rows, 1))
            # Whole or not at all (a local rename, one S3 upload): a killed task leaves no partial part.
            storage.write_bytes(storage.join(self.run_dir, name), buf.getvalue().to_pybytes())
            statuses = table.column("status").to_pylist()
            result.update(
                file=name,
                rows=table.num_rows,
                status=dict(Counter(statuses)),
                errors_by_kind=dict(Counter(S.error_kind(e) for e in table.column("error").to_pylist() if e)),
                rows_by_node=dict(Counter(n or "unknown" for n in nodes)),
                files_seen=int(pc.sum(pc.equal(table.column("frame"), 0)).as_py() or 0),
                dicom_rows=int(pc.sum(pc.is_valid(table.column("modality"))).as_py() or 0),
                scored=scored,
            )
        if self.progress is not None:
            errors = result["status"].get(S.STATUS_ERROR, 0)
            self.progress.add.remote(result["rows"], errors, result["files_seen"] + result["skipped_files"])
        return result

    def _identify(self, table: pa.Table, task_idx: int) -> pa.Table:
        """``table`` for the run's privacy mode (``pseudonymize``: paths removed, and mapped under ``path_map``)."""
        if self.path_privacy == "keep":
            return table
        uris = [str(u) for u in table.column("image_uri").to_pylist()]
        keys = table.column("image_key").to_pylist()
        if any(k == u for k, u in zip(keys, uris)):  # the driver made no keys: never write the paths
            raise ValueError("pseudonymized rows arrived without their image_key")
        errors = [S.scrub_paths(e, u, "<image>") for e, u in zip(table.column("error").to_pylist(), uris)]
        table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
        table = table.set_column(
            table.schema.get_field_index("image_uri"), "image_uri", pa.nulls(table.num_rows, pa.string())
        )
        pairs = dict(zip(keys, uris))
        run_id = self.manifest["run_id"]
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"image_key": list(pairs), "image_uri": list(pairs.values())}), buf)
        # Local files are created owner-only (storage.write_bytes): the map is the one place paths go.
        storage.write_bytes(
            storage.join(self.path_map, run_id, f"part-{task_idx:05d}.parquet"), buf.getvalue().to_pybytes()
        )
        return table

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        """Sum the tasks' results into the run's manifest (``committed``; the job writes it, last)."""
        parts = [r for r in write_result.write_returns if r]
        rel = posixpath.relpath(storage.filesystem_for(self.run_dir)[1], storage.filesystem_for(self.output)[1])
        self.committed = self.summarise(self.manifest, parts, rel, time.time() - self.t0, self.t0)
        self.files_seen = sum(r["files_seen"] for r in parts)

    @staticmethod
    def summarise(fields: dict, parts: list[dict], rel: str, elapsed: float, t0: float) -> dict:
        """The manifest from the write tasks' results."""
        status, errors, nodes = Counter(), Counter(), Counter()
        for r in parts:
            status.update(r["status"])
            errors.update(r["errors_by_kind"])
            nodes.update(r["rows_by_node"])
        rows = sum(r["rows"] for r in parts)
        # Start-up (replicas started, first batch scored) vs steady state: rows after the first batch / their time.
        scored = sorted(t for r in parts for t in r["scored"])
        first = (scored[0][0] - t0) if scored else elapsed
        later = sum(n for _, n in scored[1:])
        steady = later / max(scored[-1][0] - scored[0][0], 1e-9) if later else None
        manifest = {
            **fields,
            "files": sorted(posixpath.join(rel, r["file"]) for r in parts if r["file"]),
            "skipped_files": sum(r["skipped_files"] for r in parts),
            "rows": rows,
            "counts": {S.STATUS_OK: status[S.STATUS_OK], S.STATUS_ERROR: status[S.STATUS_ERROR]},
            "errors_by_kind": dict(errors),
            "rows_by_node": dict(nodes),
            "dicom_rows": sum(r["dicom_rows"] for r in parts),
            "oom_splits": sum(r.get("oom_splits", 0) for r in parts),
            "seconds": round(elapsed, 3),
            "rows_per_s": round(rows / max(elapsed, 1e-9), 3),
            "first_rows_seconds": round(first, 3),
            "steady_rows_per_s": round(steady, 3) if steady else None,
        }
        if "dicom_output" in fields:  # the run's DICOM folder: its objects are named by the tasks' lists
            failed, skipped = Counter(), Counter()
            for r in parts:
                failed.update(r.get("dicom_failed", {}))
                skipped.update(r.get("dicom_skipped", {}))
            manifest["dicom_objects"] = {
                "seg": sum(r.get("dicom_seg", 0) for r in parts),
                "sr": sum(r.get("dicom_sr", 0) for r in parts),
                "failed": dict(failed),
                "skipped": dict(skipped),
                "lists": sorted(r["dicom_list"] for r in parts if r.get("dicom_list")),
            }
            # sent as written (STOW-RS or C-STORE); the unsent (named in the lists) are sent by the next run
            if "pacs_url" in fields or "pacs_dicom" in fields:
                manifest["pacs"] = {
                    "sent": sum(r.get("pacs_sent", 0) for r in parts),
                    "failed": sum(r.get("pacs_unsent", 0) for r in parts),
                    "skipped": sum(skipped.values()),  # instances that are no image: nothing to send
                    "unsent_lists": sorted(r["dicom_list"] for r in parts if r.get("pacs_unsent")),
                }
        manifest["completed_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return manifest

    @classmethod
    def empty_manifest(cls, fields: dict, elapsed: float) -> dict:
        """The manifest of a run that had nothing to read (every file unchanged)."""
        return cls.summarise(fields, [], "", elapsed, time.time() - elapsed)

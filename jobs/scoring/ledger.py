"""Exactly-once bookkeeping: run folders, manifests, the compacted ``latest`` table, what to skip.

Layout under ``--output`` (local folder or ``s3://`` prefix)::

    run_date=2025-01-31/run_id=20250131T020000Z-1a2b3c4d/part-00000.parquet
    _manifests/20250131T020000Z-1a2b3c4d.json
    _latest/_manifest.json
    _latest/bucket=007/rows-20250131T020000Z-1a2b3c4d.parquet   (a bucket's base)
    _latest/bucket=007/files-20250131T020000Z-1a2b3c4d.parquet
    _latest/deltas/rows-20250201T020000Z-5e6f7a8b.parquet       (a night's delta, every bucket)
    _latest/deltas/files-20250201T020000Z-5e6f7a8b.parquet
    _leases/000000000042.json                      (see jobs/scoring/lease.py)

A run writes its Parquet files into its own ``run_id=`` folder, then its manifest LAST,
atomically (a local rename or one S3 PUT). The manifest lists the run's files and counts.

**Visible rows.** The visible row for a key ``(image_key, frame, model_version)`` is the
one from the latest completed run (largest ``run_id``; run ids sort by start time). A
frame whose file was rescored with other content (a volume re-uploaded with fewer slices)
and that the newer content no longer has is ``superseded``. :func:`window_sql` is that view.

**The compacted ``latest`` table.** After a run commits, :func:`compact` folds it into
``_latest``: the visible rows (with ``superseded``) without their masks: ``mask_file`` (a run
file, relative to ``--output``) and ``mask_row`` (its row) point to each ``mask_png``
(:func:`read_mask`). The table is a base, hash-bucketed by ``image_key``, plus nightly deltas:
a night writes one delta holding the visible rows of the files it scored (and of nothing else),
so the bytes it writes follow the rows it changed. Once the deltas' rows would pass
:data:`DELTA_SHARE` of the base's, the buckets holding delta rows are merged into a new base
instead. A key's row in a newer layer (``layer``: the compaction that wrote it) replaces older
ones (:func:`latest_view_sql`). Each bucket and delta also has a ``files`` table, one row per
(file, model version): the listing metadata it was scored at, its content hash, the frames that
are done, a 64-bit ``key`` of (image key, size, version, model version) when every frame is done
and a hash of (image key, model version) by which newer deltas replace older entries.
``_latest/_manifest.json`` names the current files and the last run folded in
(``through_run_id``); it is replaced atomically, so readers see the old or the new table, never
a mix. Readers (``jobs/report.py``, the skip decision, the README's SQL) read ``latest`` plus
any run committed after ``through_run_id`` (:func:`visible_rows`), never the whole history. Old
run folders can then be expired (:func:`expire_runs`, ``--retain-runs``) without changing what
is visible, except those holding masks of visible rows, which stay until newer runs replace them.
A table of the previous format (``adcore-latest/1``, masks inside) is read as a base that points
into itself; the next compaction rewrites it, keeping its files while visible rows point there.

**Skipping.** :func:`plan_inputs` decides from the listing alone: a file whose
(image key, size, ETag or mtime) key is in the sorted array of done keys is skipped with no GET;
the others are read once. A file whose listing is unchanged but some of whose frames
failed transiently (``inference``, ``read``) gets ``prior_done``: only its other frames are
scored again. Killing a run at any point loses nothing and duplicates nothing: the next run
commits the files the dead run wrote whole (:func:`salvage_incomplete`, before its own run id
is taken, so its rows are newer) and scores the others.

**Identity.** Every rule above keys on ``image_key``: the URI itself with ``--path-privacy
keep``, a keyed hash of it with ``pseudonymize`` (``schema.image_keys``). Files written
before ``image_key`` existed read it as their ``image_uri``, so older outputs go on as before.
An output keeps the mode of its first run (:func:`check_privacy`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from adcore import storage
from jobs.scoring import lease as leases
from jobs.scoring import schema as S
from jobs.scoring.schema import TRANSIENT_ERROR_KINDS

log = logging.getLogger(__name__)

MANIFESTS = "_manifests"
MANIFEST_FORMAT = "adcore-score-run/1"
LATEST = "_latest"
LATEST_FORMAT = "adcore-latest/2"
DEFAULT_BUCKETS = 64
KEY_HASH_CHUNK = 65_536  # listing entries hashed per chunk (bounds the transient Python strings)
# Memory a compaction task reserves on its node (Ray schedules by it); DuckDB inside it is held to a
# share of it, the rest is the Arrow tables the task reads and writes.
COMPACT_MEMORY = 2 * 2**30
DUCKDB_MEMORY_SHARE = 0.5
DUCKDB_THREADS = 1  # a compaction task is one of many on its node: one core each (its Ray num_cpus)

# Internal columns of the window: not written.
_WINDOW = """
SELECT * EXCLUDE (_rank, _newest), (content_sha256 IS DISTINCT FROM _newest) AS superseded FROM (
    SELECT *,
        row_number() OVER (PARTITION BY image_key, frame, model_version ORDER BY run_id DESC) AS _rank,
        arg_max_null(content_sha256, run_id) OVER (PARTITION BY image_key, model_version) AS _newest
    FROM {source}
) WHERE _rank = 1
"""


def window_sql(source: str) -> str:
    """The visible rows of relation ``source`` (rows of completed runs), with ``superseded``."""
    return _WINDOW.format(source=source)


# The view over a table ``scores`` of completed runs' rows (what ``latest`` must equal).
LATEST_VIEW_SQL = f"CREATE OR REPLACE VIEW latest AS {window_sql('scores')}"

# Per file and model version, from the visible rows: what the next run needs to skip it.
_FILES_SQL = """
SELECT image_key, model_version,
    arg_max_null(content_sha256, run_id) AS content_sha256,
    arg_max_null(file_size, run_id) AS file_size,
    arg_max_null(file_version, run_id) AS file_version,
    list(frame ORDER BY frame) FILTER (WHERE _done) AS done_frames,
    bool_and(_done) AS complete
FROM (
    SELECT *, (status = 'ok' OR (status = 'error' AND split_part(error, ':', 1) NOT IN ({transient}))) AS _done
    FROM visible WHERE NOT superseded
)
GROUP BY image_key, model_version
""".format(transient=", ".join(f"'{k}'" for k in TRANSIENT_ERROR_KINDS))


# ----------------------------------------------------------------------------- runs
def run_dir(output: str, run_date: str, run_id: str) -> str:
    return storage.join(output, f"run_date={run_date}", f"run_id={run_id}")


def manifest_uri(output: str, run_id: str) -> str:
    return storage.join(output, MANIFESTS, f"{run_id}.json")


def completed_runs(output: str, after: str | None = None) -> list[dict]:
    """Manifests of the completed runs under ``output`` (those after run id ``after``), oldest first.

    Manifests are named by run id, so runs up to ``after`` are not read at all. A manifest written
    after its run had lost the lease is no commit (``lease.committed_in_time``) and is left out.
    """
    out = []
    creations = None
    for m, written in _manifest_files(output):
        if after is not None and posixpath.basename(m)[: -len(".json")] <= after:
            continue
        try:
            manifest = json.loads(storage.read_bytes(m))
        except (ValueError, OSError) as e:
            raise ValueError(f"unreadable run manifest {m}: {e}") from None
        if manifest.get("format") != MANIFEST_FORMAT:
            continue
        if manifest.get("lease") is not None:
            creations = leases.lease_creations(output) if creations is None else creations
            if not leases.committed_in_time(manifest["lease"], written, creations):
                continue
        out.append(manifest)
    return sorted(out, key=lambda m: m["run_id"])


def _manifest_files(output: str) -> list[tuple[str, float | None]]:
    """(URI, when the store wrote it) of each run manifest."""
    uri = storage.join(output, MANIFESTS)
    fs, base = storage.filesystem_for(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base))
    except FileNotFoundError:
        return []
    prefix = storage.S3_PREFIX if storage.is_s3(output) else ""
    return sorted(
        (prefix + i.path, i.mtime.timestamp() if i.mtime is not None else None)
        for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(".json")
    )


def reject_late_commits(output: str) -> list[str]:
    """Delete the manifests written after their run lost the lease (no commits); returns their run ids.

    Call it holding the lease, before :func:`cleanup_incomplete` (their folders are then incomplete).
    """
    late, creations = [], leases.lease_creations(output)
    current = read_latest(output)
    through = current["through_run_id"] if current else ""
    for uri, written in _manifest_files(output):
        if posixpath.basename(uri)[: -len(".json")] <= through:
            continue  # folded into latest: accepted by an earlier holder
        try:
            lease = json.loads(storage.read_bytes(uri)).get("lease")
        except (ValueError, OSError):
            continue  # not this function's to judge
        if not leases.committed_in_time(lease, written, creations):
            late.append(uri)
    for uri in late:
        storage.delete(uri)
        log.warning("removed the manifest of run %s: written after its run had lost the lease", uri)
    return [posixpath.basename(u)[: -len(".json")] for u in late]


def completed_ids(output: str) -> set[str]:
    """Run ids of the completed runs, from the manifests' names alone (none is read)."""
    uri = storage.join(output, MANIFESTS)
    if not storage.exists(uri):
        return set()
    names = storage.list_files(uri, suffixes=[".json"], recursive=False)
    return {posixpath.basename(m)[: -len(".json")] for m in names}


def run_files(output: str, manifest: dict) -> list[str]:
    """Full URIs of the Parquet files a manifest lists."""
    return [storage.join(output, rel) for rel in manifest["files"]]


def write_manifest(output: str, manifest: dict) -> str:
    """Commit a run: after this, readers see its files."""
    uri = manifest_uri(output, manifest["run_id"])
    storage.write_bytes(uri, json.dumps({"format": MANIFEST_FORMAT, **manifest}, indent=1).encode())
    return uri


def check_privacy(output: str, mode: str) -> None:
    """Refuse a run whose ``--path-privacy`` differs from the output's committed runs (mixed identities
    would show one image twice, and a kept path beside its pseudonym undoes the pseudonym)."""
    names = sorted(completed_ids(output))
    if not names:
        return
    manifest = json.loads(storage.read_bytes(manifest_uri(output, names[-1])))
    before = manifest.get("path_privacy", "keep")
    if before != mode:
        raise ValueError(
            f"--output {output} holds runs scored with --path-privacy {before}: use the same mode or a new --output"
        )


def incomplete_run_dirs(output: str, completed_ids: set[str]) -> list[str]:
    """``run_id=`` folders that have no manifest."""
    fs, base = storage.filesystem_for(output)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return []
    found = set()
    for date_dir in fs.get_file_info(pafs.FileSelector(base)):
        if date_dir.type != pafs.FileType.Directory or not date_dir.base_name.startswith("run_date="):
            continue
        for run in fs.get_file_info(pafs.FileSelector(date_dir.path)):
            name = run.base_name
            if name.startswith("run_id=") and name[len("run_id=") :] not in completed_ids:
                found.add(run.path)
    prefix = storage.S3_PREFIX if storage.is_s3(output) else ""
    return sorted(prefix + p for p in found)


def cleanup_incomplete(output: str, completed_ids: set[str], keep: str | None = None) -> list[str]:
    """Delete the folders of runs that never completed (but run ``keep``'s); returns what was removed.

    Call it only while holding the output's lease (``jobs/scoring/lease.py``): then every other
    run's lease has ended, and a folder without a manifest is a dead run's.
    """
    removed = [u for u in incomplete_run_dirs(output, completed_ids) if not keep or not u.endswith(f"run_id={keep}")]
    for uri in removed:
        storage.delete_dir(uri)
        log.info("removed incomplete run folder %s", uri)
    return removed


RUN_STUB = "_run.json"  # in a run's folder from its start: the manifest's fields known then
PARTS_FRAMES_SUFFIX = ".frames.json"  # beside each part file: image key -> frames of its file (sink.py)


def write_run_stub(run_folder: str, fields: dict) -> None:
    """Record a starting run's manifest fields in its folder (what a salvage of its parts needs)."""
    storage.write_bytes(storage.join(run_folder, RUN_STUB), json.dumps(fields).encode())


def salvage_incomplete(output: str, completed_ids: set[str], lease: int, keep: str | None = None) -> list[dict]:
    """Commit the whole files of runs that died (killed, preempted): returns the manifests written.

    A dead run's part files are whole or absent (each is written at once); a part is kept when
    every file it has rows of has all its frames in the kept parts (``.frames.json`` beside each
    part), so the files a salvage commits are complete and the next run skips them unread. The
    other parts are removed (their files are scored again). The manifest is the dead run's, marked
    ``salvaged``, fenced by this holder's ``lease``. Runs with DICOM outputs are not salvaged.
    Call it holding the lease, before :func:`cleanup_incomplete` (which removes what is left).
    """
    out = []
    for folder in incomplete_run_dirs(output, completed_ids):
        if keep and folder.endswith(f"run_id={keep}"):
            continue
        try:
            fields = json.loads(storage.read_bytes(storage.join(folder, RUN_STUB)))
        except (FileNotFoundError, ValueError):
            continue
        if fields.get("dicom_output"):
            continue
        manifest = _salvage(output, folder, fields, lease)
        if manifest:
            out.append(manifest)
    return out


def _salvage(output: str, folder: str, fields: dict, lease: int) -> dict | None:
    parts, frames = {}, {}
    for uri in storage.list_files(folder, suffixes=[".parquet"]):
        try:
            fs, path = storage.filesystem_for(uri)
            parts[uri] = pq.read_table(path, filesystem=fs, columns=["image_key", "frame", "status", "error"])
            frames.update(json.loads(storage.read_bytes(uri + PARTS_FRAMES_SUFFIX)))
        except (OSError, ValueError, pa.ArrowInvalid):
            parts.pop(uri, None)
    kept = set(parts)
    while True:  # drop parts holding any file not whole in the kept parts, until none is left to drop
        have: dict[str, set] = {}
        for uri in kept:
            for k, f in zip(parts[uri].column("image_key").to_pylist(), parts[uri].column("frame").to_pylist()):
                have.setdefault(k, set()).add(f)
        whole = {k for k, fs in have.items() if len(fs) >= frames.get(k, len(fs) + 1)}
        now = {u for u in kept if set(parts[u].column("image_key").to_pylist()) <= whole}
        if now == kept:
            break
        kept = now
    for uri in storage.list_files(folder):
        if uri.endswith(".parquet") and uri not in kept or uri.endswith(PARTS_FRAMES_SUFFIX):
            storage.delete(uri)
    if not kept:
        return None
    table = pa.concat_tables([parts[u] for u in sorted(kept)])
    status = table.column("status").to_pylist()
    errors: dict[str, int] = {}
    for e in table.column("error").to_pylist():
        if e:
            errors[S.error_kind(e)] = errors.get(S.error_kind(e), 0) + 1
    rel = posixpath.relpath(storage.filesystem_for(folder)[1], storage.filesystem_for(output)[1])
    manifest = {
        **fields,
        "files": [posixpath.join(rel, posixpath.basename(u)) for u in sorted(kept)],
        "skipped_files": 0,
        "rows": table.num_rows,
        "counts": {S.STATUS_OK: status.count(S.STATUS_OK), S.STATUS_ERROR: status.count(S.STATUS_ERROR)},
        "errors_by_kind": errors,
        "rows_by_node": {},
        "salvaged": True,
        "lease": lease,
        "completed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_manifest(output, manifest)
    log.info(
        "kept %d row(s) of run %s, which did not complete (%d part file(s))",
        table.num_rows,
        fields["run_id"],
        len(kept),
    )
    return manifest


def read_runs(output: str, manifests: list[dict], columns: list[str] | None = None) -> pa.Table | None:
    """The rows of the given completed runs (None if they hold no file)."""
    return _read_tables([f for m in manifests for f in run_files(output, m)], columns)


def _read_tables(uris: list[str], columns: list[str] | None = None) -> pa.Table | None:
    """Parquet files (local or S3) as one table; files of older schemas get null columns."""
    if not uris:
        return None
    tables = []
    for uri in uris:
        fs, path = storage.filesystem_for(uri)
        schema = pq.read_schema(path, filesystem=fs)
        cols = None if columns is None else [c for c in columns if c in schema.names]
        if cols is not None:  # columns older files derive from others (image_key: their image_uri)
            cols += [S.DERIVED_COLUMNS[c] for c in columns if c not in schema.names and c in S.DERIVED_COLUMNS]
        tables.append(pq.read_table(path, columns=cols, filesystem=fs))
    table = S.with_added_columns(pa.concat_tables(tables, promote_options="permissive"), columns)
    return table if columns is None else table.select([c for c in table.column_names if c in columns])


def latest_rows(table: pa.Table) -> pa.Table:
    """The visible rows (with ``superseded``) of a table of completed runs' rows."""
    import duckdb

    con = duckdb.connect()
    con.register("scores", table)
    return con.sql(window_sql("scores")).to_arrow_table()


# ----------------------------------------------------------------------------- the latest table
LEGACY_LATEST_FORMAT = "adcore-latest/1"  # masks inside, no deltas: read as a base; the next compaction rewrites it
# Deltas merge into the base once their rows pass this share of its rows: readers window at most 1.2x the base,
# and an archive that changes 1 % a night rewrites its base every 20th night.
DELTA_SHARE = 0.2
MAX_DELTAS = 31  # readers open every delta's files: merge after about a month of nights whatever their size
DELTA_ROW_GROUP = 16_384  # rows per row group of a delta (sorted by bucket): a bucket's task reads its own groups
POINTER = ("mask_file", "mask_row")  # where a row's mask_png lives: a file relative to --output, its row index
LATEST_SCHEMA = pa.schema(
    [f for f in S.SCHEMA if f.name != "mask_png"]
    + [
        pa.field("superseded", pa.bool_(), nullable=False),
        pa.field("mask_file", pa.string()),
        pa.field("mask_row", pa.int64()),
        pa.field("bucket", pa.int32(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),  # through_run_id of the compaction that wrote the row
    ]
)
_LAYER_COLUMNS = ("bucket", "layer")


def latest_manifest_uri(output: str) -> str:
    return storage.join(output, LATEST, "_manifest.json")


def read_latest(output: str) -> dict | None:
    """The ``latest`` table's manifest, or None before the first compaction."""
    uri = latest_manifest_uri(output)
    if not storage.exists(uri):
        return None
    manifest = json.loads(storage.read_bytes(uri))
    if manifest.get("format") not in (LATEST_FORMAT, LEGACY_LATEST_FORMAT):
        raise ValueError(f"{uri}: not an adcore latest-table manifest")
    return manifest


def bucket_of(uris, buckets: int) -> np.ndarray:
    """Stable bucket of each image key (the first 8 bytes of its MD5, modulo ``buckets``)."""
    return np.array(
        [int.from_bytes(hashlib.md5(u.encode()).digest()[:8], "little") % buckets for u in uris], dtype=np.int32
    )


def _hash64(*columns) -> np.ndarray:
    out = np.empty(len(columns[0]), dtype=np.uint64)
    for i, parts in enumerate(zip(*columns)):
        h = hashlib.blake2b(digest_size=8)
        for part in parts:
            h.update(str("" if part is None else part).encode())
            h.update(b"\0")
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def file_keys(uris, sizes, versions, model_version: str) -> np.ndarray:
    """64-bit key of (image key, size, version, model version) per file: equal keys = nothing changed."""
    return _hash64(uris, sizes, versions, [model_version] * len(uris))


def _bucket_files(through: str, bucket: int) -> tuple[str, str]:
    d = f"bucket={bucket:03d}"
    return f"{d}/rows-{through}.parquet", f"{d}/files-{through}.parquet"


def _delta_files(through: str) -> tuple[str, str]:
    return f"deltas/rows-{through}.parquet", f"deltas/files-{through}.parquet"


def _layout(current: dict) -> tuple[list[dict], list[str]]:
    """(each bucket's base: rows file, bucket, legacy, layer; the deltas' rows files, oldest first)."""
    legacy = current["format"] == LEGACY_LATEST_FORMAT
    bases = [
        {"rows": v["rows"], "bucket": int(b), "legacy": legacy, "layer": current["through_run_id"]}
        for b, v in current["bucket_files"].items()
    ]
    return bases, [d["rows"] for d in current.get("deltas", [])]


def _run_rows(output: str, rel: str, filters=None) -> pa.Table:
    """A run file's rows, ``mask_png`` replaced by the pointer to it (this file and row; null without a mask)."""
    fs, path = storage.filesystem_for(storage.join(output, rel))
    table = S.with_added_columns(pq.read_table(path, filesystem=fs))
    n = table.num_rows
    has_mask = pc.is_valid(table.column("mask_png")) if "mask_png" in table.column_names else pa.nulls(n, pa.bool_())
    has_mask = pc.fill_null(has_mask, False)
    table = table.drop_columns([c for c in ("mask_png",) if c in table.column_names])
    rows = pa.array(np.arange(n, dtype=np.int64))
    table = table.append_column("mask_file", pc.if_else(has_mask, pa.scalar(rel), pa.scalar(None, pa.string())))
    table = table.append_column("mask_row", pc.if_else(has_mask, rows, pa.scalar(None, pa.int64())))
    return table if filters is None else table.filter(filters)


def _read_layer(output: str, rel: str, legacy: bool = False, bucket=None, layer=None, columns=None, filters=None):
    """One rows file of ``latest``; a legacy base (masks inside) gets pointers into itself, its bucket and layer."""
    uri = storage.join(output, LATEST, rel)
    fs, path = storage.filesystem_for(uri)
    if not legacy:
        return pq.read_table(path, filesystem=fs, columns=columns, filters=filters, partitioning=None)
    names = [n for n in pq.read_schema(path, filesystem=fs).names if n != "mask_png"]
    table = _read_tables([uri], names + [c for c in S.DERIVED_COLUMNS if c not in names])
    table = S.with_added_columns(table)
    n = table.num_rows
    table = table.append_column("mask_file", pa.array([f"{LATEST}/{rel}"] * n, pa.string()))
    table = table.append_column("mask_row", pa.array(np.arange(n, dtype=np.int64)))
    table = table.append_column("bucket", pa.array(np.full(n, bucket, np.int32)))
    table = table.append_column("layer", pa.array([layer] * n, pa.string()))
    table = table if filters is None else table.filter(filters)
    return table if columns is None else table.select(columns)


def _rows_layers(output, bases, deltas, bucket=None, columns=None, filters=None, con=None) -> pa.Table | None:
    """The visible rows as of the last compaction (with ``superseded``): the bases, then each delta; a key's
    row in a newer layer replaces older ones. ``bucket``: only that bucket's rows."""
    cols = None if columns is None else list(dict.fromkeys([*columns, "image_key", "frame", "model_version", "layer"]))
    in_bucket = pc.field("bucket") == bucket if bucket is not None else None
    flt = in_bucket if filters is None else filters if in_bucket is None else in_bucket & filters
    parts = [_read_layer(output, b["rows"], b["legacy"], b["bucket"], b["layer"], cols, filters) for b in bases]
    parts += [_read_layer(output, rel, columns=cols, filters=flt) for rel in deltas]
    if not parts:
        return None
    table = pa.concat_tables(parts, promote_options="permissive")
    if deltas:
        if con is None:
            import duckdb

            con = duckdb.connect()
        con.register("layers", table)
        newest = con.sql(
            "SELECT * FROM layers QUALIFY row_number() OVER "
            "(PARTITION BY image_key, frame, model_version ORDER BY layer DESC NULLS LAST) = 1"
        ).to_arrow_table()
        con.unregister("layers")
        table = newest.select(table.column_names).cast(table.schema)  # DuckDB renames the UTC zone
    table = table.drop_columns([c for c in _LAYER_COLUMNS if c in table.column_names and c not in (columns or ())])
    return table if columns is None else table.select(columns)


def _split_run_file(output: str, rel: str, buckets: int, staging: str, index: int) -> dict[int, int]:
    """Phase 1 of compaction (one task per new run file): its rows, masks as pointers, into per-bucket fragments."""
    table = _run_rows(output, rel)
    keys = table.column("image_key")
    unique = pc.unique(keys)
    bucket = np.asarray(bucket_of(unique.to_pylist(), buckets))[pc.index_in(keys, unique).to_numpy()]
    touched = {}
    for b in np.unique(bucket):
        part = table.filter(pa.array(bucket == b))
        storage.makedirs(storage.join(staging, f"bucket={b:03d}"))
        sfs, spath = storage.filesystem_for(storage.join(staging, f"bucket={b:03d}", f"{index:06d}.parquet"))
        pq.write_table(part, spath, filesystem=sfs)
        touched[int(b)] = part.num_rows
    return touched


def duckdb_connect(memory: int = COMPACT_MEMORY):
    """A DuckDB connection held to :data:`DUCKDB_THREADS` threads and a share of ``memory`` bytes
    (unset, each connection takes every core and 80 % of the node's memory), spilling to a temp folder."""
    import duckdb

    limit = max(64 * 2**20, int(memory * DUCKDB_MEMORY_SHARE))
    return duckdb.connect(config={"threads": DUCKDB_THREADS, "memory_limit": f"{limit // 2**20}MB"})


def _files_table(con, visible: pa.Table, bucket: int, layer: str) -> pa.Table:
    """Per file and model version of ``visible``: the skip state, its listing key, its (file, model) hash."""
    con.register("visible", visible)
    files = con.sql(_FILES_SQL).to_arrow_table()
    con.unregister("visible")
    keys = np.zeros(files.num_rows, dtype=np.uint64)  # 0 = not every frame done: never matches a listing key
    complete = files.column("complete").to_numpy(zero_copy_only=False)
    if complete.any():
        idx = np.flatnonzero(complete)
        sub = files.take(pa.array(idx))
        for mv in set(sub.column("model_version").to_pylist()):
            sel = np.flatnonzero(np.array(sub.column("model_version").to_pylist()) == mv)
            cols = [sub.column(c).take(pa.array(sel)).to_pylist() for c in ("image_key", "file_size", "file_version")]
            has_meta = np.array([s is not None and v is not None for s, v in zip(cols[1], cols[2])])
            k = file_keys(*cols, mv)
            keys[idx[sel[has_meta]]] = k[has_meta]  # rows without listing metadata (schema 1) never skip by key
    group = _hash64(files.column("image_key").to_pylist(), files.column("model_version").to_pylist())
    n = files.num_rows
    return (
        files.append_column("key", pa.array(keys, pa.uint64()))
        .append_column("group", pa.array(group, pa.uint64()))
        .append_column("bucket", pa.array(np.full(n, bucket, np.int32)))
        .append_column("layer", pa.array([layer] * n, pa.string()))
    )


def _merge_bucket(output, bucket, bases, deltas, fragments, layer, out, memory=COMPACT_MEMORY, touched_only=False):
    """Phase 2 of compaction (one task per bucket): its visible rows before + the new runs' rows -> visible rows.

    ``touched_only`` (a delta night): only the files the new rows touch, returned as the bucket's share of
    the night's delta. Otherwise (a merge) the bucket's whole new base, written to ``out`` (rows, files).
    """
    layer_uris = [storage.join(output, LATEST, b["rows"]) for b in bases] + [
        storage.join(output, LATEST, r) for r in deltas
    ]
    read = sum(_size(u) for u in layer_uris + fragments)
    new = _read_tables(fragments)
    con = duckdb_connect(memory)
    flt = pc.field("image_key").isin(pc.unique(new.column("image_key"))) if touched_only and new is not None else None
    old = _rows_layers(output, bases, deltas, bucket, filters=flt, con=con)
    old_rows = 0 if old is None else old.num_rows
    parts = ([] if old is None else [old.drop_columns(["superseded"])]) + ([] if new is None else [new])
    table = S.with_added_columns(pa.concat_tables(parts, promote_options="permissive"))
    con.register("scores", table)
    visible = con.sql(window_sql("scores") + " ORDER BY image_key, frame, model_version").to_arrow_table()
    n = visible.num_rows
    visible = visible.append_column("bucket", pa.array(np.full(n, bucket, np.int32)))
    visible = visible.append_column("layer", pa.array([layer] * n, pa.string()))
    visible = visible.select(LATEST_SCHEMA.names).cast(LATEST_SCHEMA)  # DuckDB renames the UTC zone
    files = _files_table(con, visible, bucket, layer)
    shown = visible.filter(pc.invert(visible.column("superseded"))).column("mask_file")
    held = [f for f in pc.unique(pc.drop_null(shown)).to_pylist() if f.startswith(LATEST + "/")]
    result = {"rows": n, "old_rows": old_rows, "files": files.num_rows, "read": read}
    result["masks"] = sorted(f[len(LATEST) + 1 :] for f in held)  # legacy bases still holding visible masks
    if out is None:
        return {**result, "rows_table": visible, "files_table": files}
    result["bytes"] = tuple(_write(uri, t) for uri, t in zip(out, (visible, files)))
    return result


def _write(uri: str, table: pa.Table, row_group_size: int | None = None) -> int:
    fs, path = storage.filesystem_for(uri)
    storage.makedirs(posixpath.dirname(uri) if not storage.is_s3(uri) else uri)
    pq.write_table(table, path, filesystem=fs, compression="zstd", row_group_size=row_group_size or max(len(table), 1))
    return _size(uri)


def _write_delta(rows_out: str, files_out: str, *parts: dict) -> dict:
    """The night's delta from the buckets' shares (given in bucket order): one rows file and one files file."""
    rows = pa.concat_tables([p["rows_table"] for p in parts])
    files = pa.concat_tables([p["files_table"] for p in parts])
    written = (_write(rows_out, rows, DELTA_ROW_GROUP), _write(files_out, files, DELTA_ROW_GROUP))
    return {"bytes": written, "parts": [{k: v for k, v in p.items() if not k.endswith("_table")} for p in parts]}


def _size(uri: str) -> int:
    fs, path = storage.filesystem_for(uri)
    return fs.get_file_info(path).size or 0


def _remote(fn, memory: int):
    import ray

    # A task that failed on the store (throttled, a network error) runs again: its outputs have fixed names.
    opts = {"num_cpus": 1, "max_retries": 3, "retry_exceptions": [OSError]}
    return ray.remote(**opts, **({"memory": memory} if memory else {}))(fn)


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _map(fn, args: list[tuple], memory: int = 0) -> list:
    """``fn(*a)`` for each ``a``: Ray tasks when Ray is running (spread over the cluster), else in turn.

    ``memory``: bytes each task reserves (Ray places no more tasks on a node than its memory holds).
    """
    if _ray_running():
        import ray

        remote = _remote(fn, memory)
        return ray.get([remote.remote(*a) for a in args])
    return [fn(*a) for a in args]


def _map_then(fn, args: list[tuple], then, then_args: tuple, memory: int = 0):
    """``then(*then_args, *results)`` of ``fn(*a)`` for each ``a``: with Ray, the results go from task to task,
    never through the driver."""
    if _ray_running():
        import ray

        remote = _remote(fn, memory)
        return ray.get(_remote(then, memory).remote(*then_args, *[remote.remote(*a) for a in args]))
    return then(*then_args, *[fn(*a) for a in args])


def has_pending(output: str) -> bool:
    """True if a run committed after ``latest`` waits to be folded into it (its manifests' names alone)."""
    current = read_latest(output)
    through = current["through_run_id"] if current else ""
    return any(r > through for r in completed_ids(output))


def compact(output: str, buckets: int = DEFAULT_BUCKETS, check=None, memory: int = COMPACT_MEMORY) -> dict | None:
    """Fold the runs committed after ``latest`` into it; returns the new latest manifest (None: no runs).

    Phase 1 splits each new run file by bucket (a task per file, masks replaced by pointers). A delta
    night then gives each touched bucket a task that windows the touched files' rows and one task writes
    them as the night's delta; once the deltas' rows would pass :data:`DELTA_SHARE` of the base's (or
    :data:`MAX_DELTAS` deltas), each bucket holding new or delta rows is merged into a new base instead.
    Then the new manifest replaces the old one in one write. Task outputs have deterministic names, so a
    retried task overwrites its own file. Call it while holding the output's lease; ``check()`` (the
    lease's) runs before the new manifest is written and raises if the lease was lost.
    """
    current = read_latest(output)
    through = current["through_run_id"] if current else None
    pending = completed_runs(output, after=through)
    if not pending:
        return current
    buckets = current["buckets"] if current else buckets
    new_through = pending[-1]["run_id"]
    staging = storage.join(output, LATEST, "_staging", new_through)
    rels = [rel for m in pending for rel in m["files"]]
    t0 = time.monotonic()
    split = _map(_split_run_file, [(output, rel, buckets, staging, i) for i, rel in enumerate(rels)], memory)
    fragments: dict[int, list[str]] = {}  # by bucket, from the split tasks' answers (no LIST of the staging area)
    for i, counts in enumerate(split):
        for b in counts:
            fragments.setdefault(b, []).append(storage.join(staging, f"bucket={b:03d}", f"{i:06d}.parquet"))
    new_rows = sum(sum(c.values()) for c in split)
    bases = {b["bucket"]: b for b in _layout(current)[0]} if current else {}
    entries = {int(b): v for b, v in current["bucket_files"].items()} if current else {}
    deltas = list(current.get("deltas", [])) if current else []
    legacy = bool(current) and current["format"] == LEGACY_LATEST_FORMAT
    base_rows = sum(v["n_rows"] for v in entries.values())
    delta_rows = sum(d["n_rows"] for d in deltas)
    merge = legacy or not entries or delta_rows + new_rows > DELTA_SHARE * base_rows or len(deltas) >= MAX_DELTAS
    touched = set(fragments)
    if merge:  # every bucket holding delta rows (a legacy base: every bucket) gets its new base
        touched |= {b for d in deltas for b in d["buckets"]} | (set(entries) if legacy else set())
    touched = sorted(touched)
    delta_rels = [d["rows"] for d in deltas]

    def job(b, out):
        base = [bases[b]] if b in bases else []
        return (output, b, base, delta_rels, fragments.get(b, []), new_through, out, memory, not merge)

    new_entries, new_deltas = dict(entries), deltas
    if merge:
        outs = {b: [storage.join(output, LATEST, r) for r in _bucket_files(new_through, b)] for b in touched}
        results = _map(_merge_bucket, [job(b, outs[b]) for b in touched], memory)
        for b, r in zip(touched, results):
            rows_rel, files_rel = _bucket_files(new_through, b)
            entry = {"rows": rows_rel, "files": files_rel, "n_rows": r["rows"], "n_files": r["files"]}
            new_entries[b] = {**entry, "n_bytes": sum(r["bytes"]), **({"masks": r["masks"]} if r["masks"] else {})}
        new_deltas, written = [], sum(sum(r["bytes"]) for r in results)
    elif not touched:  # runs without rows (nothing changed): no delta
        results, written = [], 0
    else:
        rows_rel, files_rel = _delta_files(new_through)
        outs = (storage.join(output, LATEST, rows_rel), storage.join(output, LATEST, files_rel))
        done = _map_then(_merge_bucket, [job(b, None) for b in touched], _write_delta, outs, memory)
        results, written = done["parts"], sum(done["bytes"])
        delta = {"through": new_through, "rows": rows_rel, "files": files_rel, "buckets": touched}
        delta |= {"n_rows": sum(r["rows"] for r in results), "n_files": sum(r["files"] for r in results)}
        new_deltas = [*deltas, {**delta, "n_bytes": written}]
    table_bytes = sum(v["n_bytes"] for v in new_entries.values()) + sum(d["n_bytes"] for d in new_deltas)
    manifest = {
        "format": LATEST_FORMAT,
        "through_run_id": new_through,
        "buckets": buckets,
        "bucket_files": {f"{b:03d}": v for b, v in sorted(new_entries.items())},
        "deltas": new_deltas,
        "rows": (current["rows"] if current else 0) + sum(r["rows"] - r["old_rows"] for r in results),
        "runs_folded": [m["run_id"] for m in pending],
        # What the last compaction cost: its kind, seconds, bytes its tasks read and wrote, the table's bytes.
        "compaction": {
            "kind": "merge" if merge else "delta",
            "seconds": round(time.monotonic() - t0, 3),
            "buckets_rewritten": len(touched) if merge else 0,
            "bytes_read": sum(r["read"] for r in results),
            "bytes_written": written,
            "table_bytes": table_bytes,
        },
    }
    if check is not None:
        check()
    storage.write_bytes(latest_manifest_uri(output), json.dumps(manifest, indent=1).encode())
    named = _named(manifest)
    replaced = [rel for b in touched if b in entries for rel in _entry_files(entries[b])] if merge else []
    for rel in replaced + ([rel for d in deltas for rel in (d["rows"], d["files"])] if merge else []):
        if rel not in named:  # no reader of the new manifest needs it
            storage.delete(storage.join(output, LATEST, rel))
    storage.delete_dir(staging)
    log.info(
        "latest: folded %d run(s) as a %s (%d of %d buckets, %d visible rows, %d bytes written of %d)",
        len(pending),
        "merge into the base" if merge else "delta",
        len(touched),
        buckets,
        manifest["rows"],
        written,
        table_bytes,
    )
    return manifest


def _entry_files(entry: dict) -> list[str]:
    return [entry["rows"], entry["files"], *entry.get("masks", [])]


def _named(manifest: dict | None) -> set[str]:
    """Every file under ``_latest/`` a latest manifest needs (relative to ``_latest``)."""
    if not manifest:
        return set()
    named = {rel for v in manifest["bucket_files"].values() for rel in _entry_files(v)}
    return named | {rel for d in manifest.get("deltas", []) for rel in (d["rows"], d["files"])}


def cleanup_latest(output: str) -> list[str]:
    """Delete ``_latest`` files no manifest names (a compaction that died half-way). Hold the lease."""
    named = _named(read_latest(output))
    base = storage.join(output, LATEST)
    if not storage.exists(base):
        return []
    removed = []
    for f in storage.list_files(base):
        rel = posixpath.relpath(storage.filesystem_for(f)[1], storage.filesystem_for(base)[1])
        if rel != "_manifest.json" and rel not in named:
            storage.delete(f)
            removed.append(rel)
    return removed


def latest_files(output: str, kind: str = "rows") -> list[str]:
    """URIs of the ``latest`` table's current files (``rows`` or ``files``): the bases, then the deltas."""
    current = read_latest(output)
    if not current:
        return []
    rels = [v[kind] for v in current["bucket_files"].values()] + [d[kind] for d in current.get("deltas", [])]
    return [storage.join(output, LATEST, rel) for rel in rels]


def _pending_rows(output: str, pending: list[dict], filters=None) -> pa.Table | None:
    parts = [_run_rows(output, rel, filters) for m in pending for rel in m["files"]]
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def visible_rows(output: str, columns: list[str] | None = None) -> pa.Table | None:
    """The visible rows: ``latest`` plus the runs committed after it, windowed (None: nothing yet).

    Masks are not in them: ``mask_file`` and ``mask_row`` point to each (:func:`read_mask`).
    """
    current = read_latest(output)
    pending = completed_runs(output, after=current["through_run_id"] if current else None)
    cols = None if columns is None else list(dict.fromkeys([*columns, *_WINDOW_COLUMNS]))
    base = _rows_layers(output, *_layout(current), columns=cols) if current else None
    if not pending:
        return None if base is None else base.select(columns) if columns else base
    new = _pending_rows(output, pending)
    if new is not None and cols is not None:
        new = new.select([c for c in cols if c in new.column_names])
    if base is not None:
        base = base.drop_columns(["superseded"])
    table = new if base is None else pa.concat_tables([base, new], promote_options="permissive")
    if table is None:
        return None
    out = latest_rows(table)
    return out.select(columns) if columns else out


_WINDOW_COLUMNS = ("image_key", "frame", "model_version", "run_id", "content_sha256", "superseded")


def _key_column(fs, path: str) -> str:
    """The identity column of a Parquet file: ``image_key``, or ``image_uri`` in files older than it."""
    return "image_key" if "image_key" in pq.read_schema(path, filesystem=fs).names else "image_uri"


def read_mask(output: str, mask_file: str | None, mask_row: int | None) -> bytes | None:
    """The ``mask_png`` a row points to (None: the row has none, or its file is gone)."""
    if mask_file is None or mask_row is None:
        return None
    fs, path = storage.filesystem_for(storage.join(output, mask_file))
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            start = 0
            for i in range(pf.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if mask_row < start + n:
                    return pf.read_row_group(i, columns=["mask_png"]).column(0)[mask_row - start].as_py()
                start += n
    except FileNotFoundError:
        log.warning("the file holding a mask is gone: %s", mask_file)
    return None


def read_row(output: str, image_key: str, frame: int, columns: list[str]) -> list[dict]:
    """Columns of one image frame's visible rows (one per model version), reading only its bucket;
    ``mask_png`` is fetched through each row's pointer."""
    current = read_latest(output)
    want = list(dict.fromkeys([c for c in columns if c != "mask_png"] + ["model_version", "run_id", *POINTER]))
    flt = (pc.field("image_key") == image_key) & (pc.field("frame") == frame)
    found = []
    if current:
        b = int(bucket_of([image_key], current["buckets"])[0])
        bases, deltas = _layout(current)
        table = _rows_layers(output, [s for s in bases if s["bucket"] == b], deltas, b, want, flt)
        found = [] if table is None else table.to_pylist()
    pending = completed_runs(output, after=current["through_run_id"] if current else None)
    new = _pending_rows(output, pending, flt)
    found += [] if new is None else new.select(want).to_pylist()
    newest: dict[str, dict] = {}
    for r in found:  # a run committed after the compaction wins
        if r["model_version"] not in newest or r["run_id"] > newest[r["model_version"]]["run_id"]:
            newest[r["model_version"]] = r
    rows = []
    for r in newest.values():
        if "mask_png" in columns:
            r["mask_png"] = read_mask(output, r["mask_file"], r["mask_row"])
        rows.append({k: r[k] for k in columns})
    return rows


def latest_view_sql(output: str) -> str:
    """DuckDB SQL for the view ``latest`` (visible rows, not superseded) read straight from the files: each
    bucket's base and the deltas, a key's row from the newest layer (``docs/analysts.md`` shows it)."""
    rows = storage.join(output, LATEST, "*", "rows-*.parquet")
    return f"""CREATE OR REPLACE VIEW latest AS
  SELECT * EXCLUDE (bucket, layer) FROM read_parquet('{rows}', hive_partitioning = false, union_by_name = true)
  QUALIFY row_number() OVER (PARTITION BY image_key, frame, model_version ORDER BY layer DESC NULLS LAST) = 1
    AND NOT superseded"""


def _run_folder(m: dict) -> str:
    return f"run_date={m['run_date']}/run_id={m['run_id']}"


def mask_folders(output: str) -> set[str]:
    """Run folders (relative to ``output``) that visible rows of ``latest`` take their masks from."""
    current = read_latest(output)
    if not current:
        return set()
    bases, deltas = _layout(current)
    folders = set()
    shown = ~pc.field("superseded") & pc.field("mask_file").is_valid()
    for rel in [b["rows"] for b in bases if not b["legacy"]] + deltas:  # a legacy base holds its own masks
        table = _read_layer(output, rel, columns=["mask_file"], filters=shown)
        folders.update(posixpath.dirname(f) for f in pc.unique(table.column("mask_file")).to_pylist())
    return folders


def expire_runs(output: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` runs already folded into ``latest``; returns their run ids.

    A run whose folder still holds masks of visible rows is kept (the report's overlays and analysts
    read them there) until newer runs replace those rows. The manifest goes first (the run stops
    existing for readers), then its folder. What is visible does not change. Hold the lease.
    """
    current = read_latest(output)
    if keep <= 0 or not current:
        return []
    runs = completed_runs(output)
    old = [m for m in runs[:-keep] if m["run_id"] <= current["through_run_id"]]
    held = mask_folders(output) if old else set()
    expired = [m for m in old if _run_folder(m) not in held]
    if len(expired) < len(old):
        log.info("kept %d run folder(s) past --retain-runs: visible rows take masks from them", len(old) - len(expired))
    for m in expired:
        storage.delete(manifest_uri(output, m["run_id"]))
        storage.delete_dir(run_dir(output, m["run_date"], m["run_id"]))
        log.info("expired run %s", m["run_id"])
    return [m["run_id"] for m in expired]


# ----------------------------------------------------------------------------- the skip decision
LISTING_COLUMNS = ("image_key", "size", "version")


def listing_keys(listing: pa.Table, model_version: str) -> np.ndarray:
    """:func:`file_keys` of every listing entry, hashed a chunk at a time."""
    out = np.empty(listing.num_rows, dtype=np.uint64)
    for start in range(0, listing.num_rows, KEY_HASH_CHUNK):
        part = listing.slice(start, KEY_HASH_CHUNK)
        cols = [part.column(c).to_pylist() for c in LISTING_COLUMNS]
        out[start : start + part.num_rows] = file_keys(*cols, model_version)
    return out


def _current_files(output: str, columns: list[str], filters=None):
    """The ``files`` tables of ``latest`` (``columns``), newest first, without the entries a newer delta replaces."""
    current = read_latest(output)
    if not current:
        return
    deltas = [storage.join(output, LATEST, d["files"]) for d in reversed(current.get("deltas", []))]
    seen = np.zeros(0, np.uint64)  # (file, model version) hashes of the deltas read so far
    for uri in deltas + [storage.join(output, LATEST, v["files"]) for v in current["bucket_files"].values()]:
        fs, path = storage.filesystem_for(uri)
        key = _key_column(fs, path) if "image_key" in columns else "image_key"
        cols = [key if c == "image_key" else c for c in columns]
        extra = ["group"] if len(seen) else []
        table = pq.read_table(path, filesystem=fs, columns=cols + extra, filters=filters, partitioning=None)
        if len(seen):
            table = table.filter(pa.array(~np.isin(table.column("group").to_numpy(), seen)))
        yield table.select(cols).rename_columns(columns)
        if uri in deltas:
            groups = pq.read_table(path, filesystem=fs, columns=["group"]).column("group").to_numpy()
            seen = np.union1d(seen, groups)


def done_keys(output: str) -> np.ndarray:
    """Sorted keys of the files every frame of which is done, over the bases and deltas of ``latest``."""
    parts = []
    for table in _current_files(output, ["key"]):
        keys = table.column("key").to_numpy()
        parts.append(keys[keys != 0])
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)


def plan_inputs(output: str, listing: pa.Table, model_version: str, rescore_all: bool = False) -> tuple[pa.Table, int]:
    """(files to read, number skipped) for tonight's listing; call after :func:`compact`.

    The result is the listing's rows that changed or are new (all of them with
    ``rescore_all``), with ``prior_sha`` and ``prior_done`` (frames already done) set for files
    whose listing is unchanged but which have frames left to score.
    """
    n = listing.num_rows
    if "image_key" not in listing.column_names:  # paths kept: the key is the URI
        listing = listing.append_column("image_key", listing.column("uri"))
    if rescore_all or n == 0:
        todo = listing
    else:
        keys = listing_keys(listing, model_version)
        done = done_keys(output)
        pos = np.searchsorted(done, keys)
        hit = (pos < len(done)) & (done[np.minimum(pos, len(done) - 1)] == keys) if len(done) else np.zeros(n, bool)
        todo = listing.filter(pa.array(~hit))
    todo = _with_prior(output, todo, model_version) if not rescore_all else _no_prior(todo)
    return todo, n - todo.num_rows


def _no_prior(todo: pa.Table) -> pa.Table:
    return todo.append_column("prior_sha", pa.nulls(todo.num_rows, pa.string())).append_column(
        "prior_done", pa.nulls(todo.num_rows, pa.list_(pa.int32()))
    )


def _with_prior(output: str, todo: pa.Table, model_version: str) -> pa.Table:
    """Join the partly-done files' state (rare: files with transient errors) onto ``todo``."""
    flt = (pc.field("model_version") == model_version) & ~pc.field("complete")
    cols = ["image_key", "model_version", "complete", "file_size", "file_version", "content_sha256", "done_frames"]
    parts = list(_current_files(output, cols, flt))
    partial = pa.concat_tables(parts) if parts else None
    if partial is None or partial.num_rows == 0 or todo.num_rows == 0:
        return _no_prior(todo)
    import duckdb

    con = duckdb.connect()
    con.register("todo", todo)
    con.register("partial", partial)
    return con.sql(
        """SELECT t.*, p.content_sha256 AS prior_sha, CAST(p.done_frames AS INTEGER[]) AS prior_done
        FROM todo t LEFT JOIN partial p
        ON t.image_key = p.image_key AND t.size = p.file_size AND t.version = p.file_version
        ORDER BY t.uri"""
    ).to_arrow_table()

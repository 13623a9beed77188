"""The night's listing of an S3 archive, in parallel: prefix ranges listed by Ray tasks, or an S3 Inventory.

Both give what ``storage.list_objects`` gives (columns ``uri``, ``size``, ``version`` = the ETag,
hidden names left out, sorted by ``uri``), so change detection and ``--max-file-bytes`` see
the same listing whichever way it was made. Local folders are listed by ``storage.list_objects``.

**Prefix ranges.** A few LIST calls with ``Delimiter="/"`` find the archive's folders
(:func:`discover`, breadth first, until there are enough of them or a level is too large to
enumerate). The key space under the input is then cut into ranges ``(after, until]`` that
cover it exactly once: a folder found whole, or a large flat level cut at the next character
of its keys (``key/0``, ``key/1``, ...), and every range is listed by one task
(:func:`list_ranges`, S3's own pagination from ``StartAfter``). The tasks return Arrow tables.

**S3 Inventory.** ``--inventory URI`` names an inventory report's ``manifest.json`` (as AWS
writes it: ``fileFormat`` CSV, Parquet or ORC, ``fileSchema``, ``files``); each data file is
read by one task (:func:`read_inventory_file`), its rows under the input kept. An inventory is
as old as its report (daily or weekly): files added since are scored the night after they
appear in it, files deleted since become ``read`` error rows.

No URI is logged here (paths can name patients); counts only.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from adcore import storage
from adcore.errors import StorageURIError

log = logging.getLogger(__name__)

DEFAULT_TASKS = 64  # listing tasks at most: S3 serves each prefix at thousands of LISTs/s
MAX_DEPTH = 4  # folder levels discovery descends before it cuts what it has into ranges
DISCOVERY_THREADS = 16  # concurrent LISTs of one discovery level
SINGLE_PAGE = 1000  # an input of at most this many objects is listed by one LIST, in the driver
DISCOVERY_PAGE = 1000  # entries of a folder level enumerated during discovery (one LIST page); more: ranges
# Where a level too large to enumerate is cut: its keys' next character (ASCII order, as S3 sorts).
SPLIT_CHARS = "-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class KeyRange:
    """Keys under ``prefix`` greater than ``after`` (None: from the first) and at most ``until`` (None: all).

    ``nested``: only keys in a folder below ``prefix`` (the files directly in it are listed elsewhere).
    """

    prefix: str
    after: str | None = None
    until: str | None = None
    nested: bool = False

    def holds(self, key: str) -> bool:
        if self.after is not None and key <= self.after or self.until is not None and key > self.until:
            return False
        return key.startswith(self.prefix) and (not self.nested or "/" in key[len(self.prefix) :])


def empty_listing() -> pa.Table:
    return pa.table(
        [pa.array([], pa.string()), pa.array([], pa.int64()), pa.array([], pa.string())],
        schema=storage._listing_schema(),
    )


def _entries(bucket: str, keys: list[str], sizes: list[int], etags: list[str], skip_hidden: bool) -> pa.Table:
    uris = [f"{storage.S3_PREFIX}{bucket}/{k}" for k in keys]
    table = pa.table(
        [pa.array(uris, pa.string()), pa.array(sizes, pa.int64()), pa.array(etags, pa.string())],
        schema=storage._listing_schema(),
    )
    return _drop_hidden(table) if skip_hidden else table


def _drop_hidden(table: pa.Table) -> pa.Table:
    """Rows whose name (after the last "/") does not start with "."."""
    if not table.num_rows:
        return table
    hidden = pc.match_substring_regex(table.column("uri"), r"(^|/)\.[^/]*$")
    return table.filter(pc.invert(hidden))


# ----------------------------------------------------------------------------- prefix ranges
def _root(uri: str) -> tuple[str, str]:
    """(bucket, key prefix ending in "/" or empty) of an ``s3://`` input."""
    bucket, key = storage._bucket_key(uri.rstrip("/"))
    return bucket, (key.rstrip("/") + "/") if key else ""


def discover(client, bucket: str, root: str, want: int, skip_hidden: bool = True) -> tuple[list[KeyRange], pa.Table]:
    """(about ``want`` ranges covering every key under ``root`` except those returned, the files found on the way).

    Breadth first: one LIST page per folder and level (concurrently); a folder whose level fits
    in one page gives its files and subfolders, one that does not is cut by :data:`SPLIT_CHARS`.
    Descends while there are fewer than ``want`` folders, at most :data:`MAX_DEPTH` levels; the
    folders of the last level are grouped into about ``want`` ranges of consecutive siblings.
    """
    ranges: list[KeyRange] = []
    found: list[pa.Table] = []
    level: list[tuple[str | None, str]] = [(None, root)]  # (parent, folder)
    for depth in range(MAX_DEPTH + 1):
        if not level:
            break
        if depth == MAX_DEPTH or len(level) >= want:
            ranges += group_folders(level, want)
            break
        with ThreadPoolExecutor(min(DISCOVERY_THREADS, len(level))) as pool:
            pages = list(
                pool.map(
                    lambda p: client.list_objects_v2(Bucket=bucket, Prefix=p, Delimiter="/", MaxKeys=DISCOVERY_PAGE),
                    [f for _, f in level],
                )
            )
        nxt = []
        for (_, prefix), page in zip(level, pages):
            if page.get("IsTruncated"):  # too large to enumerate a page at a time here: cut into ranges
                ranges += split_flat(prefix, -(-want // len(level)))
                continue
            contents = page.get("Contents", ())
            found.append(
                _entries(
                    bucket,
                    [o["Key"] for o in contents],
                    [o["Size"] for o in contents],
                    [o["ETag"].strip('"') for o in contents],
                    skip_hidden,
                )
            )
            nxt += [(prefix, c["Prefix"]) for c in page.get("CommonPrefixes", ())]
        level = sorted(nxt, key=lambda pf: pf[1])
    return sorted(ranges, key=lambda r: (r.prefix, r.after or "")), (
        pa.concat_tables(found) if found else empty_listing()
    )


def group_folders(level: list[tuple[str | None, str]], want: int) -> list[KeyRange]:
    """About ``want`` ranges over the (parent, folder) pairs of a level, each a run of consecutive siblings.

    A run of one folder is that folder; a longer one is the parent's keys from the first folder
    through the last one's subtree, folders only (``nested``): the parent's own files were found by
    discovery. The run ``f1/ .. fk/`` ends at ``fk0`` (``"/" < "0"``: past every key under ``fk/``,
    before the next folder).
    """
    by_parent: dict[str | None, list[str]] = {}
    for parent, folder in level:
        by_parent.setdefault(parent, []).append(folder)
    out = []
    for parent, folders in by_parent.items():
        folders.sort()
        pieces = max(1, round(want * len(folders) / len(level)))
        size = -(-len(folders) // pieces)
        runs = [folders[i : i + size] for i in range(0, len(folders), size)]
        if parent is None or len(runs) == len(folders):
            out += [KeyRange(f) for f in folders]
            continue
        bounds = [run[-1][:-1] + "0" for run in runs[:-1]]
        for k, run in enumerate(runs):
            after = bounds[k - 1] if k else None
            until = bounds[k] if k < len(bounds) else None
            out.append(KeyRange(run[0]) if len(run) == 1 else KeyRange(parent, after, until, nested=True))
    return out


def split_flat(prefix: str, pieces: int = len(SPLIT_CHARS) + 1) -> list[KeyRange]:
    """About ``pieces`` ranges covering every key under ``prefix`` exactly once, cut at the next character."""
    n = max(1, min(pieces, len(SPLIT_CHARS) + 1))
    bounds = [prefix + SPLIT_CHARS[i * len(SPLIT_CHARS) // n] for i in range(1, n)]
    if not bounds:
        return [KeyRange(prefix)]
    out = [KeyRange(prefix, None, bounds[0])]
    out += [KeyRange(prefix, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    out.append(KeyRange(prefix, bounds[-1], None))
    return out


def list_ranges(bucket: str, ranges: list[KeyRange], skip_hidden: bool = True) -> pa.Table:
    """Every object in ``ranges`` (a task's share), as a listing table (unsorted)."""
    client = storage.s3_client()
    keys, sizes, etags = [], [], []
    for r in ranges:
        kwargs = {"Bucket": bucket, "Prefix": r.prefix}
        if r.after is not None:
            kwargs["StartAfter"] = r.after
        for page in client.get_paginator("list_objects_v2").paginate(**kwargs):
            done = False
            for obj in page.get("Contents", ()):
                key = obj["Key"]
                if r.until is not None and key > r.until:
                    done = True
                    break
                if r.nested and "/" not in key[len(r.prefix) :]:
                    continue  # a file of the parent folder itself: discovery has it
                keys.append(key)
                sizes.append(obj["Size"])
                etags.append(obj["ETag"].strip('"'))
            if done:
                break
    return _entries(bucket, keys, sizes, etags, skip_hidden)


def _groups(ranges: list[KeyRange], tasks: int) -> list[list[KeyRange]]:
    """``ranges`` in at most ``tasks`` consecutive groups of about equal count."""
    if not ranges:
        return []
    n = max(1, min(tasks, len(ranges)))
    size = -(-len(ranges) // n)
    return [ranges[i : i + size] for i in range(0, len(ranges), size)]


def list_prefixes(uri: str, tasks: int = DEFAULT_TASKS, skip_hidden: bool = True, start=None) -> pa.Table:
    """The listing of ``s3://`` ``uri``: discovery here, then the ranges in up to ``tasks`` Ray tasks.

    An input that fits in one LIST page is that page. ``start()``, if given, is called before the
    tasks (it starts Ray). Without Ray running the ranges are listed in turn (same result). A URI
    naming one object (no key below it) is listed as that object, as ``storage.list_objects`` does.
    """
    bucket, root = _root(uri)
    client = storage.s3_client()
    first = client.list_objects_v2(Bucket=bucket, Prefix=root, MaxKeys=SINGLE_PAGE)
    if not first.get("IsTruncated"):  # one page holds it all: no discovery, no task
        contents = first.get("Contents", ())
        keys, sizes, etags = [o["Key"] for o in contents], [o["Size"] for o in contents], [o["ETag"] for o in contents]
        table = _entries(bucket, keys, sizes, [e.strip('"') for e in etags], skip_hidden)
        return table.sort_by("uri") if table.num_rows or not root else storage.list_objects(uri, skip_hidden)
    ranges, found = discover(client, bucket, root, max(1, tasks), skip_hidden)
    groups = _groups(ranges, tasks)
    parts = [found, *_map_tasks(list_ranges, [(bucket, g, skip_hidden) for g in groups], start)]
    table = pa.concat_tables(parts)
    log.info("listed %d objects in %d range(s) by %d task(s)", table.num_rows, len(ranges), len(groups))
    return table.sort_by("uri")


def _map_tasks(fn, args: list[tuple], start=None) -> list:
    """``fn(*a)`` for each ``a``: Ray tasks when Ray is running (``start()`` first, for more than one), else in turn."""
    if start is not None and len(args) > 1:
        start()
    try:
        import ray
    except ImportError:  # pragma: no cover - Ray is a dependency of the jobs
        ray = None
    if ray is not None and ray.is_initialized() and len(args) > 1:
        # A LIST is I/O: a task needs little CPU. Retried on the store's transient failures.
        remote = ray.remote(num_cpus=0.25, max_retries=3, retry_exceptions=[OSError])(fn)
        return ray.get([remote.remote(*a) for a in args])
    return [fn(*a) for a in args]


# ----------------------------------------------------------------------------- S3 Inventory
INVENTORY_FORMATS = ("CSV", "Parquet", "ORC")
# Parquet/ORC column names of an inventory (CSV has none: its ``fileSchema`` names them in order).
_FIELD_COLUMNS = {
    "Bucket": "bucket",
    "Key": "key",
    "Size": "size",
    "ETag": "e_tag",
    "IsLatest": "is_latest",
    "IsDeleteMarker": "is_delete_marker",
}


def read_inventory_manifest(uri: str) -> dict:
    """An inventory's ``manifest.json``: checked, with its data files as full URIs."""
    if not storage.is_s3(uri) and not uri.endswith("manifest.json"):
        raise StorageURIError(f"--inventory {uri}: expected the manifest.json of an S3 Inventory report")
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except ValueError as e:
        raise StorageURIError(f"--inventory {uri}: not an S3 Inventory manifest.json ({e})") from None
    fmt = manifest.get("fileFormat")
    if fmt not in INVENTORY_FORMATS or "files" not in manifest:
        raise StorageURIError(f"--inventory {uri}: fileFormat {fmt!r}; expected one of {', '.join(INVENTORY_FORMATS)}")
    fields = [f.strip() for f in manifest.get("fileSchema", "").split(",") if f.strip()]
    if fmt == "CSV" and not {"Key", "Size", "ETag"} <= set(fields):
        raise StorageURIError(f"--inventory {uri}: the report must include the Size and ETag fields")
    dest = manifest.get("destinationBucket", "").rsplit(":", 1)[-1]  # "arn:aws:s3:::bucket" -> "bucket"
    # The data files' keys are in the destination bucket; a report copied elsewhere keeps them beside it.
    base = f"{storage.S3_PREFIX}{dest}" if dest and storage.is_s3(uri) else uri.rsplit("/", 1)[0]
    files = [storage.join(base, f["key"]) for f in manifest["files"]]
    return {"format": fmt, "fields": fields, "files": files, "source_bucket": manifest.get("sourceBucket", "")}


def read_inventory_file(uri: str, fmt: str, fields: list[str], bucket: str, prefix: str, skip_hidden: bool) -> pa.Table:
    """One inventory data file's objects under ``bucket``/``prefix`` (current versions only)."""
    data = storage.read_bytes(uri)
    if fmt == "CSV":
        table = _inventory_csv(data, fields)
    elif fmt == "Parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
    else:
        import pyarrow.orc as orc

        table = orc.read_table(io.BytesIO(data))
    table = table.rename_columns([_snake(c) for c in table.column_names])
    for need in ("bucket", "key", "size", "e_tag"):
        if need not in table.column_names:
            raise StorageURIError(f"inventory data file has no {need} column: add Size and ETag to the report")
    keep = pc.equal(table.column("bucket"), bucket)
    if prefix:
        keep = pc.and_(keep, pc.starts_with(table.column("key"), prefix))
    if "is_latest" in table.column_names:
        keep = pc.and_(keep, pc.fill_null(pc.cast(table.column("is_latest"), pa.bool_()), True))
    if "is_delete_marker" in table.column_names:
        keep = pc.and_(keep, pc.invert(pc.fill_null(pc.cast(table.column("is_delete_marker"), pa.bool_()), False)))
    keep = pc.and_(keep, pc.is_valid(table.column("size")))
    table = table.filter(keep)
    uris = pc.binary_join_element_wise(f"{storage.S3_PREFIX}{bucket}", table.column("key"), "/")
    out = pa.table(
        [uris.cast(pa.string()), table.column("size").cast(pa.int64()), table.column("e_tag").cast(pa.string())],
        schema=storage._listing_schema(),
    )
    return _drop_hidden(out) if skip_hidden else out


def _snake(name: str) -> str:
    """Parquet/ORC inventories name columns ``e_tag``, ``is_latest``; CSV fields are ``ETag``, ``IsLatest``."""
    return _FIELD_COLUMNS.get(name, name.lower())


def _inventory_csv(data: bytes, fields: list[str]) -> pa.Table:
    import pyarrow.csv as pcsv

    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    names = [_FIELD_COLUMNS.get(f, f.lower()) for f in fields]
    types = {"bucket": pa.string(), "key": pa.string(), "size": pa.int64(), "e_tag": pa.string()}
    table = pcsv.read_csv(
        io.BytesIO(data),
        read_options=pcsv.ReadOptions(column_names=names),
        convert_options=pcsv.ConvertOptions(column_types={k: v for k, v in types.items() if k in names}),
    )
    # CSV inventories URL-encode keys ("a%20b.png", "+" for a space).
    keys = [urllib.parse.unquote_plus(k) for k in table.column("key").to_pylist()]
    return table.set_column(names.index("key"), "key", pa.array(keys, pa.string()))


def list_inventory(inventory: str, uri: str, skip_hidden: bool = True, start=None) -> pa.Table:
    """The listing of ``s3://`` ``uri`` from the inventory report at ``inventory`` (its data files in tasks)."""
    manifest = read_inventory_manifest(inventory)
    bucket, root = _root(uri)
    if manifest["source_bucket"] and manifest["source_bucket"] != bucket:
        raise StorageURIError(f"--inventory describes another bucket than --input's ({bucket})")
    args = [(f, manifest["format"], manifest["fields"], bucket, root, skip_hidden) for f in manifest["files"]]
    parts = _map_tasks(read_inventory_file, args, start)
    table = pa.concat_tables(parts) if parts else empty_listing()
    log.info("inventory: %d objects under the input in %d data file(s)", table.num_rows, len(args))
    return table.sort_by("uri")


def list_archive(uri: str, inventory: str = "", tasks: int = DEFAULT_TASKS, start=None, filters=None) -> pa.Table:
    """The night's listing of ``uri``: from ``inventory`` if given, by prefix tasks on S3, by QIDO-RS from a
    DICOMweb server (``filters``: ``qido.Filters``), else locally.

    ``start()`` is called before any tasks are made (it starts Ray, which a small input never needs).
    """
    from jobs.scoring import dicomweb, qido

    if dicomweb.is_dicomweb(uri):
        if inventory:
            raise StorageURIError("--inventory lists an s3:// --input (a DICOMweb input is listed by QIDO-RS)")
        return qido.list_archive(uri, filters or qido.Filters(), _map_tasks, start)
    if inventory:
        if not storage.is_s3(uri):
            raise StorageURIError("--inventory lists an s3:// --input (a local folder is listed directly)")
        return list_inventory(inventory, uri, start=start)
    if storage.is_s3(uri) and tasks > 1:
        return list_prefixes(uri, tasks, start=start)
    return storage.list_objects(uri)

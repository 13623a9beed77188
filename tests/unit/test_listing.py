"""The night's listing of an S3 archive by prefix-range tasks and from an S3 Inventory report equals
the serial LIST loop's (the same sizes and ETags the ledger keys on, hidden names left out)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import urllib.parse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adcore import storage
from adcore.errors import StorageURIError
from jobs.scoring import listing

# Nested folders, a flat folder larger than a discovery page, names S3 sorts around the cut points.
KEYS = (
    ["top.png", ".hidden.png", "a/x.png", "a/.cache/y.png", "a/b/c/d/e/deep.png", "ab/not-under-a.png"]
    + [f"p{i % 3}/s{i % 4}/img{i:03d}.dcm" for i in range(40)]
    + [f"flat/{c}{i}.png" for c in "0aZ_~-." for i in range(4)]
    + ["flat/é.png", "flat/ space.png", "flat/~", "flat/0", "flat/z/under.png", "flat/zz", "0", "Z", "~"]
)


@pytest.fixture(scope="module")
def archive(s3_server):
    bucket = s3_server.make_bucket("listing-test")
    client = storage.s3_client()
    for i, key in enumerate(KEYS):
        client.put_object(Bucket="listing-test", Key=f"arch/{key}", Body=b"x" * (i + 1))
    client.put_object(Bucket="listing-test", Key="archive-other/z.png", Body=b"z")
    return f"{bucket}/arch"


@pytest.mark.parametrize(
    "tasks,page,single", [(1, 1000, 1), (4, 1000, 1), (64, 1000, 1), (8, 5, 1), (64, 3, 1), (8, 5, 1000)]
)
def test_prefix_ranges_list_what_the_serial_loop_lists(archive, monkeypatch, tasks, page, single):
    monkeypatch.setattr(listing, "SINGLE_PAGE", single)  # 1: the archive is not listed by one LIST
    monkeypatch.setattr(listing, "DISCOVERY_PAGE", page)  # small pages: large levels are cut into ranges
    expected = storage.list_objects(archive)
    got = listing.list_prefixes(archive, tasks)
    assert got.equals(expected), (got.num_rows, expected.num_rows)
    names = [u.removeprefix(archive + "/") for u in got.column("uri").to_pylist()]
    assert "a/b/c/d/e/deep.png" in names and "ab/not-under-a.png" in names and "flat/é.png" in names
    assert not any(n.rsplit("/", 1)[-1].startswith(".") for n in names)
    assert not any(n.startswith("../archive-other") for n in names)


@pytest.mark.parametrize("pieces", [1, 2, 7, 67, 500])
def test_cut_ranges_cover_each_key_once(pieces):
    ranges = listing.split_flat("f/", pieces)
    assert len(ranges) == min(pieces, len(listing.SPLIT_CHARS) + 1)
    keys = ["f/", "f/\x00", "f/-", "f/0", "f/00", "f/z", "f/zz", "f/~", "f/é", "f/" + "\U0010ffff", "f/a/b"]
    for k in keys:
        assert sum(r.holds(k) for r in ranges) == 1, k


@pytest.mark.parametrize("want", [1, 3, 10, 100])
def test_grouped_folders_hold_each_key_under_them_once(want):
    parents = ["r/a/", "r/b/"]
    folders = [(p, f"{p}{name}/") for p in parents for name in ["0", "1", "10", "1-", "x", "x0", "y.z", "é"]]
    ranges = listing.group_folders(sorted(folders, key=lambda pf: pf[1]), want)
    assert len(ranges) <= max(want, len(parents)) + len(parents)
    for _, f in folders:
        for key in (f + "img.png", f + "deep/er.png", f):
            assert sum(r.holds(key) for r in ranges) == 1, (key, [r for r in ranges if r.holds(key)])
    for key in ("r/a/file.png", "r/a/x0", "r/b/10", "r/c/other.png"):  # files of a parent, another parent
        assert not any(r.holds(key) for r in ranges), key


@pytest.mark.parametrize("single", [1, 1000])
def test_sub_prefix_and_single_object(archive, monkeypatch, single):
    monkeypatch.setattr(listing, "SINGLE_PAGE", single)
    got = listing.list_prefixes(archive + "/a", 8).column("uri").to_pylist()
    # Not ab/; a hidden folder's files are listed (only names starting with "." are left out), as the loop does.
    assert got == [f"{archive}/a/.cache/y.png", f"{archive}/a/b/c/d/e/deep.png", f"{archive}/a/x.png"]
    one = listing.list_prefixes(archive + "/top.png", 8)
    assert one.column("uri").to_pylist() == [f"{archive}/top.png"] and one.column("size").to_pylist() == [1]


def _inventory_rows(bucket: str) -> list[dict]:
    """What S3 Inventory reports for ``bucket`` (versioned: a delete marker and an old version too)."""
    client = storage.s3_client()
    rows = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", ()):
            rows.append({"bucket": bucket, "key": o["Key"], "size": o["Size"], "etag": o["ETag"].strip('"')})
    rows.append({"bucket": bucket, "key": "arch/gone.png", "size": None, "etag": None, "marker": True})
    rows.append({"bucket": bucket, "key": "arch/top.png", "size": 9, "etag": "old", "latest": False})
    rows.append({"bucket": "another", "key": "arch/elsewhere.png", "size": 1, "etag": "e"})
    return rows


def _write_inventory(fmt: str, bucket: str, dest: str) -> str:
    rows = _inventory_rows(bucket)
    fields = ["Bucket", "Key", "VersionId", "IsLatest", "IsDeleteMarker", "Size", "ETag"]
    if fmt == "CSV":
        out = io.StringIO()
        w = csv.writer(out, quoting=csv.QUOTE_ALL)
        for r in rows:
            latest, marker = r.get("latest", True), r.get("marker", False)
            size = "" if r["size"] is None else str(r["size"])
            key = urllib.parse.quote_plus(r["key"], safe="/")  # CSV inventories URL-encode keys
            w.writerow([r["bucket"], key, "v", str(latest).lower(), str(marker).lower(), size, r["etag"] or ""])
        data, name = gzip.compress(out.getvalue().encode()), "data/part-0.csv.gz"
    else:
        table = pa.table(
            {
                "bucket": [r["bucket"] for r in rows],
                "key": [r["key"] for r in rows],
                "version_id": ["v"] * len(rows),
                "is_latest": [r.get("latest", True) for r in rows],
                "is_delete_marker": [r.get("marker", False) for r in rows],
                "size": pa.array([r["size"] for r in rows], pa.int64()),
                "e_tag": [r["etag"] for r in rows],
            }
        )
        sink = io.BytesIO()
        pq.write_table(table.slice(0, 20), sink)
        first = sink.getvalue()
        sink = io.BytesIO()
        pq.write_table(table.slice(20), sink)
        data, name = (first, sink.getvalue()), "data/part-{}.parquet"
    base = f"inv/{bucket}/cfg/2026-01-01T01-00Z"
    files = []
    for i, blob in enumerate(data if isinstance(data, tuple) else (data,)):
        key = f"inv/{bucket}/cfg/{name.format(i)}"
        storage.write_bytes(f"s3://{dest}/{key}", blob)
        files.append({"key": key, "size": len(blob), "MD5checksum": "-"})
    manifest = {
        "sourceBucket": bucket,
        "destinationBucket": f"arn:aws:s3:::{dest}",
        "version": "2016-11-30",
        "fileFormat": fmt,
        "fileSchema": ", ".join(fields) if fmt == "CSV" else "message s3.inventory { }",
        "files": files,
    }
    uri = f"s3://{dest}/{base}/manifest.json"
    storage.write_bytes(uri, json.dumps(manifest).encode())
    return uri


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_inventory_lists_what_list_lists(archive, s3_server, fmt):
    s3_server.make_bucket("listing-inventory")
    inventory = _write_inventory(fmt, "listing-test", "listing-inventory")
    got = listing.list_archive(archive, inventory=inventory)
    assert got.equals(storage.list_objects(archive))


def test_inventory_refusals(archive, s3_server, tmp_path):
    s3_server.make_bucket("listing-inventory")
    inventory = _write_inventory("CSV", "listing-test", "listing-inventory")
    with pytest.raises(StorageURIError, match="another bucket"):
        listing.list_archive("s3://some-other-bucket/x", inventory=inventory)
    with pytest.raises(StorageURIError, match="s3:// --input"):
        listing.list_archive(str(tmp_path), inventory=inventory)
    storage.write_bytes("s3://listing-inventory/bad/manifest.json", json.dumps({"fileFormat": "XLS"}).encode())
    with pytest.raises(StorageURIError, match="fileFormat"):
        listing.list_archive(archive, inventory="s3://listing-inventory/bad/manifest.json")


def test_job_refuses_an_inventory_for_a_local_input_in_one_line(tmp_path):
    from jobs.score import list_inputs

    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(SystemExit, match="--inventory lists an s3:// --input"):
        list_inputs(str(tmp_path), inventory="s3://inventory/x/manifest.json")
    assert list_inputs(str(tmp_path)).column("uri").to_pylist() == [str(tmp_path / "a.png")]


def test_ray_is_started_only_for_an_input_that_needs_tasks(archive, monkeypatch):
    started = []
    small = listing.list_archive(archive, tasks=8, start=lambda: started.append(1))
    assert started == [] and small.equals(storage.list_objects(archive))  # one LIST page: no task
    monkeypatch.setattr(listing, "SINGLE_PAGE", 1)
    large = listing.list_archive(archive, tasks=8, start=lambda: started.append(1))
    assert started == [1] and large.equals(small)

"""The ``latest`` table as a base and nightly deltas: bytes a night writes, visible rows, masks by pointer."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adcore import storage
from jobs.scoring import ledger
from jobs.scoring import schema as S
from jobs.scoring.schema import TRANSIENT_ERROR_KINDS

MV = "m-v1-abc"
COLS = ("image_uri", "content_sha256", "frame", "status", "error", "file_size", "file_version", "mask_png")


def mask(seed: int, shape=(24, 24)) -> bytes:
    m = np.zeros(shape, bool)
    r, c = 4 + seed % 8, 4 + seed % 10
    m[r : r + 8, c : c + 8] = True
    return S.encode_mask(m)


def row(uri, sha, frame=0, status="ok", error=None, size=1, version="v1", seed=0):
    return (uri, sha, frame, status, error, size, version, mask(seed) if status == "ok" else None)


def commit(out, run_id, rows):
    """A completed run holding ``rows`` (tuples in COLS order), as the job writes one."""
    rel = f"run_date=2025-01-01/run_id={run_id}/part-00000.parquet"
    storage.makedirs(storage.join(out, f"run_date=2025-01-01/run_id={run_id}"))
    cols = {k: [r[i] for r in rows] for i, k in enumerate(COLS)}
    table = S.to_table(cols, model_name="m", model_version=MV, run_id=run_id, scored_at=dt.datetime.now())
    pq.write_table(table, f"{out}/{rel}")
    ledger.write_manifest(out, {"run_id": run_id, "run_date": "2025-01-01", "model_version": MV, "files": [rel]})
    return table


def window(tables):
    con = duckdb.connect()
    con.register("scores", pa.concat_tables(tables, promote_options="permissive"))
    return con.sql(ledger.window_sql("scores")).to_arrow_table()


KEYED = ("image_uri", "frame", "run_id", "content_sha256", "status", "superseded")


def keyed(table, cols=KEYED):
    return sorted(zip(*[table.column(c).to_pylist() for c in cols]))


def latest_bytes(tmp_path) -> int:
    current = ledger.read_latest(str(tmp_path / "out"))
    return sum((tmp_path / "out/_latest" / rel).stat().st_size for rel in ledger._named(current))


def test_a_night_changing_one_file_of_many_writes_only_a_small_delta(tmp_path):
    out = str(tmp_path / "out")
    commit(out, "r1", [row(f"img{i:05d}", f"h{i}", seed=i) for i in range(10_000)])
    first = ledger.compact(out, buckets=4)
    assert first["compaction"]["kind"] == "merge"
    for f in (tmp_path / "out/_latest").rglob("rows-*.parquet"):  # masks stay in the run files
        assert "mask_png" not in pq.read_schema(f).names and "mask_file" in pq.read_schema(f).names
    base = {f: f.stat().st_mtime_ns for f in (tmp_path / "out/_latest").rglob("bucket=*/*.parquet")}
    commit(out, "r2", [row("img00007", "h-new", size=2, version="v2", seed=99)])
    second = ledger.compact(out)
    cost = second["compaction"]
    assert cost["kind"] == "delta" and cost["buckets_rewritten"] == 0
    assert cost["bytes_written"] == second["deltas"][0]["n_bytes"] and cost["table_bytes"] == latest_bytes(tmp_path)
    assert cost["bytes_written"] < 0.03 * cost["table_bytes"], cost  # 1 file of 10,000: a delta, not a bucket
    assert {f: f.stat().st_mtime_ns for f in base if f.exists()} == base  # no base file rewritten or removed
    assert second["rows"] == 10_000 == ledger.visible_rows(out).num_rows


def analysts_latest(out: str) -> list[tuple]:
    """The README's DuckDB view of ``latest`` (docs/analysts.md), straight from the files."""
    con = duckdb.connect()
    con.execute(ledger.latest_view_sql(out))
    return sorted(con.sql("SELECT image_uri, frame, run_id, content_sha256, status FROM latest").fetchall())


def expected_todo(visible: pa.Table) -> list[str]:
    """Files the skip decision must read for a listing of their newest state: those with a transient error."""
    todo = set()
    for r in visible.to_pylist():
        if not r["superseded"] and r["status"] == "error" and S.error_kind(r["error"]) in TRANSIENT_ERROR_KINDS:
            todo.add(r["image_uri"])
    return sorted(todo)


NIGHTS = [
    # r1: 20 files, "a" a volume of 3 frames, "c" a transient error, "d" a corrupt file.
    [row("a", "ha1", f, size=1, version="v1", seed=f) for f in range(3)]
    + [row("c", "hc", status="error", error="inference: server down")]
    + [row("d", "hd", status="error", error="corrupt: bad")]
    + [row(f"f{i:02d}", f"hf{i}", seed=i) for i in range(17)],
    # r2: "a" re-uploaded with 2 frames, "f03" changed, a new file "z".
    [row("a", "ha2", f, size=2, version="v2", seed=10 + f) for f in range(2)]
    + [row("f03", "hf3b", size=2, version="v2", seed=5), row("z", "hz", seed=7)],
    # r3: the transient error scored again; "z" changed.
    [row("c", "hc", seed=3), row("z", "hz2", size=3, version="v3", seed=8)],
    # r4: some files rescored with the same content.
    [row(f"f{i:02d}", f"hf{i}", seed=i) for i in range(5, 12)],
    # r5: "a" again, 1 frame; "f03" a read error.
    [row("a", "ha3", 0, size=3, version="v3", seed=4), row("f03", None, status="error", error="read: gone")],
]


@pytest.mark.parametrize("how", ["deltas", "merges"])
def test_visible_rows_equal_the_window_over_all_runs_night_after_night(tmp_path, monkeypatch, how):
    out = str(tmp_path / "out")
    # A share no night reaches (deltas pile up), or one that most nights pass (deltas and merges interleave).
    monkeypatch.setattr(ledger, "DELTA_SHARE", 10.0 if how == "deltas" else 0.3)
    runs, kinds = [], []
    for i, night in enumerate(NIGHTS, 1):
        runs.append(commit(out, f"r{i}", night))
        manifest = ledger.compact(out, buckets=4)
        kinds.append(manifest["compaction"]["kind"])
        want = window(runs)
        got = ledger.visible_rows(out)
        assert keyed(got) == keyed(want), f"night {i}"
        assert manifest["rows"] == got.num_rows
        assert analysts_latest(out) == sorted(
            (r["image_uri"], r["frame"], r["run_id"], r["content_sha256"], r["status"])
            for r in want.to_pylist()
            if not r["superseded"]
        )
        # Every visible mask through its pointer.
        masks = {(r["image_uri"], r["frame"]): r["mask_png"] for r in want.to_pylist()}
        for r in got.to_pylist():
            assert ledger.read_mask(out, r["mask_file"], r["mask_row"]) == masks[(r["image_uri"], r["frame"])]
        # The skip decision on a listing of every file's newest state reads only the unfinished ones.
        newest = {r["image_uri"]: (r["file_size"], r["file_version"]) for r in want.to_pylist() if not r["superseded"]}
        listing = pa.table(
            {
                "uri": list(newest),
                "size": pa.array([v[0] for v in newest.values()], pa.int64()),
                "version": [v[1] for v in newest.values()],
            }
        )
        todo, _ = ledger.plan_inputs(out, listing, MV)
        assert sorted(todo.column("uri").to_pylist()) == expected_todo(got), f"night {i}"
        if i == 2:  # "a" uploaded again as it was on night 1: its old key must not count as done
            back = pa.table({"uri": ["a"], "size": pa.array([1], pa.int64()), "version": ["v1"]})
            assert ledger.plan_inputs(out, back, MV)[0].column("uri").to_pylist() == ["a"]
    commit(out, "r6", [])  # a night without changes: no delta, nothing rewritten
    empty = ledger.compact(out)
    assert empty["compaction"]["bytes_written"] == 0 and empty["through_run_id"] == "r6"
    assert keyed(ledger.visible_rows(out)) == keyed(window(runs))
    current = ledger.read_latest(out)
    if how == "deltas":
        assert kinds == ["merge"] + ["delta"] * 4 and len(current["deltas"]) == 4
    else:
        assert "merge" in kinds[1:] and "delta" in kinds[1:]
    assert ledger.cleanup_latest(out) == []  # every file the manifest names kept, nothing else left


def test_report_overlay_keeps_its_mask_after_runs_expire(tmp_path):
    from PIL import Image

    from jobs import report

    out = str(tmp_path / "out")
    img = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((24, 24)) * 255).astype(np.uint8)).save(img)
    a, b = str(img), str(tmp_path / "b.png")
    commit(out, "r1", [row(a, "ha", seed=1), row(b, "hb", seed=2)])
    ledger.compact(out, buckets=4)
    commit(out, "r2", [row(b, "hb2", size=2, version="v2", seed=3)])
    ledger.compact(out)
    commit(out, "r3", [row(b, "hb3", size=3, version="v3", seed=4)])
    ledger.compact(out)
    expired = ledger.expire_runs(out, keep=1)
    visible = {r["image_key"]: r for r in ledger.visible_rows(out).to_pylist()}
    png = report._mask_of(out, visible[a])
    assert png == mask(1)
    overlay = Image.open(io.BytesIO(base64.b64decode(report.overlay(a, 0, png).split(",", 1)[1])))
    red = np.all(np.asarray(overlay.convert("RGB")) == report.CONTOUR_RGB, axis=-1)
    assert red.sum() >= 20  # the mask's contour is drawn
    # r2's rows are all replaced: it goes; r1 still holds the mask of a visible row: it stays.
    assert expired == ["r2"] and (tmp_path / "out/run_date=2025-01-01/run_id=r1").exists()


def test_a_latest_table_of_the_previous_format_is_read_then_rewritten_once(tmp_path):
    """adcore-latest/1 held the masks in its rows: read as a base, rewritten by the next compaction, its files
    kept while visible rows take masks from them."""
    out = str(tmp_path / "out")
    runs = [commit(out, "r1", [row(u, "h" + u, seed=i) for i, u in enumerate("abcdefgh")])]
    legacy_v1(out, runs[0], buckets=4)
    assert keyed(ledger.visible_rows(out)) == keyed(window(runs))
    assert ledger.read_row(out, "c", 0, ["mask_png"]) == [{"mask_png": mask(2)}]
    runs.append(commit(out, "r2", [row("a", "ha2", size=2, version="v2", seed=9)]))
    upgraded = ledger.compact(out)
    assert upgraded["format"] == ledger.LATEST_FORMAT and upgraded["compaction"]["kind"] == "merge"
    assert keyed(ledger.visible_rows(out)) == keyed(window(runs))
    assert ledger.expire_runs(out, keep=1) == ["r1"]  # its masks live on in the old table's files
    assert ledger.cleanup_latest(out) == []
    assert ledger.read_row(out, "c", 0, ["mask_png"]) == [{"mask_png": mask(2)}]
    assert ledger.read_row(out, "a", 0, ["mask_png", "run_id"]) == [{"mask_png": mask(9), "run_id": "r2"}]


def legacy_v1(out: str, run: pa.Table, buckets: int) -> None:
    """``latest`` as the previous format wrote it: per bucket, the visible rows with their masks."""
    v1 = S.SCHEMA.append(pa.field("superseded", pa.bool_(), nullable=False))
    visible = window([run]).select(v1.names).cast(v1)
    con = duckdb.connect()
    bucket = ledger.bucket_of(visible.column("image_key").to_pylist(), buckets)
    entries = {}
    for b in np.unique(bucket):
        rows = visible.filter(pa.array(bucket == b))
        files = ledger._files_table(con, rows, int(b), "r1").drop_columns(["group", "bucket", "layer"])
        rows_rel, files_rel = ledger._bucket_files("r1", int(b))
        for rel, t in ((rows_rel, rows), (files_rel, files)):
            storage.makedirs(f"{out}/_latest/{rel.rsplit('/', 1)[0]}")
            pq.write_table(t, f"{out}/_latest/{rel}")
        entries[f"{b:03d}"] = {"rows": rows_rel, "files": files_rel, "n_rows": rows.num_rows, "n_bytes": 0}
    manifest = {"format": "adcore-latest/1", "through_run_id": "r1", "buckets": buckets, "bucket_files": entries}
    storage.write_bytes(f"{out}/_latest/_manifest.json", json.dumps(manifest | {"rows": visible.num_rows}).encode())

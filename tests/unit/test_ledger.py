"""The ledger at small scale, without Ray: compaction into ``latest``, the skip decision, retention, leases."""

from __future__ import annotations

import datetime as dt
import threading
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adcore import storage
from jobs.scoring import lease as leases
from jobs.scoring import ledger
from jobs.scoring import schema as S

MV = "m-v1-abc"
COLS = ("image_uri", "content_sha256", "frame", "status", "error", "file_size", "file_version")


def commit_run(out, run_id, rows, model_version=MV):
    """A completed run holding ``rows`` (tuples in COLS order), as the job writes one."""
    rel = f"run_date=2025-01-01/run_id={run_id}/part-00000.parquet"
    path = f"{out}/{rel}"
    storage.makedirs(storage.join(out, f"run_date=2025-01-01/run_id={run_id}"))
    cols = {k: [r[i] for r in rows] for i, k in enumerate(COLS)}
    table = S.to_table(cols, model_name="m", model_version=model_version, run_id=run_id, scored_at=dt.datetime.now())
    pq.write_table(table, path)
    ledger.write_manifest(
        out, {"run_id": run_id, "run_date": "2025-01-01", "model_version": model_version, "files": [rel]}
    )
    return table


def listing(entries):
    return pa.table(
        {"uri": [e[0] for e in entries], "size": [e[1] for e in entries], "version": [e[2] for e in entries]},
        schema=pa.schema([("uri", pa.string()), ("size", pa.int64()), ("version", pa.string())]),
    )


def window(tables):
    """The reference: the windowed view over every run's rows."""
    con = duckdb.connect()
    con.register("scores", pa.concat_tables(tables, promote_options="permissive"))
    return con.sql(ledger.window_sql("scores") + " ORDER BY image_uri, frame").to_arrow_table()


def visible(out):
    con = duckdb.connect()
    con.register("v", ledger.visible_rows(out))
    return con.sql("SELECT * FROM v ORDER BY image_uri, frame").to_arrow_table()


def keyed(table, cols=("image_uri", "frame", "run_id", "content_sha256", "status", "superseded")):
    return sorted(zip(*[table.column(c).to_pylist() for c in cols]))


def test_skip_decision_from_the_listing_alone(tmp_path):
    out = str(tmp_path / "out")
    commit_run(
        out,
        "r1",
        [
            ("a", "h1", 0, "ok", None, 10, "v1"),
            ("a", "h1", 1, "ok", None, 10, "v1"),
            ("b", "h2", 0, "error", "corrupt: bad", 5, "v1"),
            ("c", "h3", 0, "ok", None, 7, "v1"),
            ("c", "h3", 1, "error", "inference: server down", 7, "v1"),
        ],
    )
    ledger.compact(out, buckets=4)
    now = listing([("a", 10, "v1"), ("b", 5, "v1"), ("c", 7, "v1"), ("d", 3, "v1")])
    todo, skipped = ledger.plan_inputs(out, now, MV)
    # a and b are done (a deterministic decode error is done too); c has a transient error; d is new.
    assert skipped == 2 and todo.column("uri").to_pylist() == ["c", "d"]
    prior = dict(zip(todo.column("uri").to_pylist(), todo.column("prior_done").to_pylist()))
    assert prior == {"c": [0], "d": None} and todo.column("prior_sha").to_pylist() == ["h3", None]
    # A new ETag/mtime or size is a change; another model version scores everything.
    changed = listing([("a", 10, "v2"), ("b", 6, "v1"), ("c", 7, "v1")])
    assert ledger.plan_inputs(out, changed, MV)[0].column("uri").to_pylist() == ["a", "b", "c"]
    assert ledger.plan_inputs(out, now, "m-v2-def")[1] == 0
    assert ledger.plan_inputs(out, now, MV, rescore_all=True)[0].num_rows == 4


def test_latest_equals_the_window_over_all_runs_and_rewrites_only_touched_buckets(tmp_path):
    out = str(tmp_path / "out")
    runs = [
        commit_run(out, "r1", [(u, "h" + u, f, "ok", None, 1, "v1") for u in "abcdefgh" for f in range(3)]),
    ]
    first = ledger.compact(out, buckets=8)
    assert first["through_run_id"] == "r1" and first["rows"] == 24
    # r2: volume "a" re-uploaded with one slice fewer; "b" fixed from an error; a new file "z".
    runs.append(
        commit_run(
            out,
            "r2",
            [
                ("a", "ha2", 0, "ok", None, 2, "v2"),
                ("a", "ha2", 1, "ok", None, 2, "v2"),
                ("z", "hz", 0, "ok", None, 1, "v1"),
            ],
        )
    )
    second = ledger.compact(out, buckets=8)
    # A small night: its rows go to a delta of the buckets they touch; no base file is rewritten.
    assert second["compaction"]["kind"] == "delta" and second["bucket_files"] == first["bucket_files"]
    assert second["deltas"][-1]["buckets"] == sorted({int(ledger.bucket_of([u], 8)[0]) for u in ("a", "z")})
    assert keyed(visible(out)) == keyed(window(runs))
    sup = [r for r in visible(out).to_pylist() if r["superseded"]]
    assert [(r["image_uri"], r["frame"]) for r in sup] == [("a", 2)]  # the slice the new volume no longer has
    # A rescore-all run supersedes every earlier row, a run committed after compaction is seen too.
    runs.append(commit_run(out, "r3", [(u, "h" + u, f, "ok", None, 1, "v1") for u in "bcdefgh" for f in range(3)]))
    assert keyed(visible(out)) == keyed(window(runs))  # r3 not folded yet: read beside latest
    ledger.compact(out)
    assert keyed(visible(out)) == keyed(window(runs))
    # Retention: the two oldest runs go, the visible rows do not change.
    assert ledger.expire_runs(out, keep=1) == ["r1", "r2"]
    assert [m["run_id"] for m in ledger.completed_runs(out)] == ["r3"]
    assert not (tmp_path / "out/run_date=2025-01-01/run_id=r1").exists()
    assert keyed(visible(out)) == keyed(window(runs))


def test_cleanup_removes_dead_runs_and_orphan_latest_files_only(tmp_path):
    out = str(tmp_path / "out")
    commit_run(out, "r1", [("a", "h", 0, "ok", None, 1, "v1")])
    ledger.compact(out, buckets=2)
    dead = tmp_path / "out/run_date=2025-01-02/run_id=r2"
    mine = tmp_path / "out/run_date=2025-01-02/run_id=r3"
    for d in (dead, mine):
        d.mkdir(parents=True)
        (d / "part-00000.parquet").write_bytes(b"partial")
    orphan = tmp_path / "out/_latest/bucket=001/rows-r9.parquet"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"half-written")
    assert ledger.cleanup_incomplete(out, ledger.completed_ids(out), keep="r3") == [str(dead)]
    assert not dead.exists() and mine.exists()
    assert ledger.cleanup_latest(out) == ["bucket=001/rows-r9.parquet"]
    assert ledger.visible_rows(out).num_rows == 1


def _wait_until_expired(out: str, deadline_s: float = 60.0) -> None:
    """Until the live lease's recorded expiry has passed (the holder stopped renewing it)."""
    deadline = time.monotonic() + deadline_s
    while leases.current_holder(out) is not None:
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.05)


def test_a_second_run_is_refused_until_the_lease_is_released_or_expires(tmp_path):
    out = str(tmp_path / "out")
    first = leases.acquire(out, "run-1", ttl_s=30)
    with pytest.raises(leases.LeaseHeld, match="being scored by run run-1.*--wait-for-lease"):
        leases.acquire(out, "run-2", ttl_s=30)
    first.release()
    # A TTL far longer than the next two calls take, even on a loaded machine.
    second = leases.acquire(out, "run-2", ttl_s=3.0)
    second._stop.set()  # a crash: the heartbeat stops, nothing releases the lease
    second._thread.join()
    with pytest.raises(leases.LeaseHeld):
        leases.acquire(out, "run-3", ttl_s=30)
    _wait_until_expired(out)
    third = leases.acquire(out, "run-3", ttl_s=30)  # expired: taken over
    with pytest.raises(leases.LeaseLost, match="run-2 lost the lease"):
        second.check()  # the stalled run must not commit
    third.check()
    third.release()


def test_wait_for_lease_waits_for_the_holder(tmp_path, lease_waiting):
    out = str(tmp_path / "out")
    holder = leases.acquire(out, "run-1", ttl_s=30)
    released = threading.Event()

    def release_once_waited_for():
        if lease_waiting.wait(60):
            holder.release()
            released.set()

    threading.Thread(target=release_once_waited_for, daemon=True).start()
    waiter = leases.acquire(out, "run-2", ttl_s=30, wait_s=120)
    assert lease_waiting.is_set() and released.is_set(), "the lease was taken without waiting for its holder"
    assert waiter.number == holder.number + 1
    waiter.release()


def test_racing_runs_get_exactly_one_lease(tmp_path):
    out = str(tmp_path / "out")
    won, refused = [], []

    def race(i):
        try:
            won.append(leases.acquire(out, f"run-{i}", ttl_s=30))
        except leases.LeaseHeld:
            refused.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    won[0].release()


def test_local_listing_has_sizes_and_versions_and_skips_hidden_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/b.png").write_bytes(b"12345")
    (tmp_path / "a.png").write_bytes(b"1")
    (tmp_path / ".hidden").write_bytes(b"x")
    t = storage.list_objects(tmp_path)
    assert t.column("uri").to_pylist() == [str(tmp_path / "a.png"), str(tmp_path / "sub/b.png")]
    assert t.column("size").to_pylist() == [1, 5] and all(v.isdigit() for v in t.column("version").to_pylist())
    assert storage.create_exclusive(tmp_path / "x", b"1") and not storage.create_exclusive(tmp_path / "x", b"2")
    with pytest.raises(FileNotFoundError):
        storage.list_objects(tmp_path / "missing")


def test_compaction_reports_its_bytes_and_duckdb_is_held_to_its_limits(tmp_path):
    out = str(tmp_path / "out")
    commit_run(out, "r1", [(u, "h" + u, 0, "ok", None, 1, "v1") for u in "abcdefghijklmnop"])
    assert ledger.has_pending(out)
    first = ledger.compact(out, buckets=8)
    assert not ledger.has_pending(out)
    files = [f for f in (tmp_path / "out/_latest").rglob("*.parquet")]
    on_disk = sum(f.stat().st_size for f in files)
    cost = first["compaction"]
    assert cost["table_bytes"] == on_disk == cost["bytes_written"] and cost["bytes_read"] > 0
    commit_run(out, "r2", [("a", "ha2", 0, "ok", None, 2, "v2")])
    assert ledger.has_pending(out)
    second = ledger.compact(out)["compaction"]
    delta = ledger.read_latest(out)["deltas"][-1]
    assert second["buckets_rewritten"] == 0 and second["bytes_written"] == delta["n_bytes"]
    assert second["bytes_written"] < second["table_bytes"]
    con = ledger.duckdb_connect(2**30)
    assert con.execute("SELECT current_setting('threads')").fetchall()[0][0] == ledger.DUCKDB_THREADS
    limit = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    assert limit.endswith(("MiB", "MB")) and 400 < float(limit.split()[0]) <= 512, limit

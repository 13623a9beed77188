"""Incremental nightly runs at archive scale: skip from the listing, the compacted latest table, one writer.

The S3 endpoint is a real moto server whose requests are counted (a WSGI wrapper around moto's
own application), so "an unchanged rerun reads no image" is checked on the wire.
"""

from __future__ import annotations

import collections
import io
import os
import threading
import time

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from adcore import storage
from jobs.scoring import lease as leases
from jobs.scoring import ledger

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

BUCKET = "incremental"
PREFIX = "archive"


class CountingS3:
    """A moto S3 server on 127.0.0.1 that counts requests by (method, path)."""

    def __init__(self):
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.counts: collections.Counter = collections.Counter()
        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ, start_response):
            self.counts[(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))] += 1
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counting, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def image_gets(self) -> int:
        """GETs of objects under the archive prefix (listings are GETs of the bucket itself)."""
        return sum(n for (m, p), n in self.counts.items() if m == "GET" and p.startswith(f"/{BUCKET}/{PREFIX}/"))


@pytest.fixture(scope="module")
def s3_and_ray():
    """The counting server, AWS_* pointing at it, and a local Ray started after (workers inherit the env)."""
    import boto3
    import ray

    env = {
        "AWS_ACCESS_KEY_ID": "testing-key",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    s3 = CountingS3()
    env["AWS_ENDPOINT_URL"] = s3.endpoint
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket=BUCKET)
    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-score")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield s3
    finally:
        ray.shutdown()
        s3.server.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def png(value: int, shape=(32, 40)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(value)
    buf = io.BytesIO()
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def nifti(slices: int, seed: int) -> bytes:
    import nibabel as nib

    data = (np.random.default_rng(seed).random((24, 20, slices)) * 100).astype(np.float32)
    return nib.Nifti1Image(data, np.eye(4)).to_bytes()


def config(**kw):
    from jobs.score import ScoreConfig

    return ScoreConfig(**({"batch_size": 8, "progress_every_s": 0.5, "latest_buckets": 8} | kw))


def keyed(table):
    cols = ("image_uri", "frame", "model_version", "run_id", "content_sha256", "status", "superseded")
    return sorted(zip(*[table.column(c).to_pylist() for c in cols]))


def window_over(tables):
    con = duckdb.connect()
    con.register("scores", pa.concat_tables(tables, promote_options="permissive"))
    return con.sql(ledger.window_sql("scores")).to_arrow_table()


def new_rows(out, manifest):
    return ledger.read_runs(out, [m for m in ledger.completed_runs(out) if m["run_id"] == manifest["run_id"]])


def test_unchanged_rerun_reads_nothing_and_changes_rescore_exactly_those(s3_and_ray, tiny_artifact):
    from jobs.score import main

    s3 = s3_and_ray
    src, out = f"s3://{BUCKET}/{PREFIX}", f"s3://{BUCKET}/scores"
    files = {f"img{i:02d}.png": png(i) for i in range(12)} | {"vol/brain.nii": nifti(3, 0)}
    for name, data in files.items():
        storage.write_bytes(f"{src}/{name}", data)
    runs = []

    s3.counts.clear()
    m1 = main(config(input=src, model=tiny_artifact, output=out))
    runs.append(new_rows(out, m1))
    assert m1["rows"] == 12 + 3 and s3.image_gets() == len(files)  # every file read exactly once

    s3.counts.clear()
    m2 = main(config(input=src, model=tiny_artifact, output=out))
    assert s3.image_gets() == 0, s3.counts  # unchanged: decided from the listing alone
    assert m2["rows"] == 0 and m2["skipped_files"] == len(files) and m2["unchanged_files"] == len(files)

    # Three objects change (two images, and the volume re-uploaded with one slice fewer) and one is new.
    storage.write_bytes(f"{src}/img03.png", png(103))
    storage.write_bytes(f"{src}/img07.png", png(107))
    storage.write_bytes(f"{src}/vol/brain.nii", nifti(2, 1))
    storage.write_bytes(f"{src}/new.png", png(200))
    s3.counts.clear()
    m3 = main(config(input=src, model=tiny_artifact, output=out))
    runs.append(new_rows(out, m3))
    assert s3.image_gets() == 4 and m3["rows"] == 2 + 2 + 1 and m3["skipped_files"] == len(files) - 3
    latest = ledger.visible_rows(out)
    gone = [r for r in latest.to_pylist() if r["superseded"]]
    assert [(r["image_uri"].rsplit("/", 1)[-1], r["frame"]) for r in gone] == [("brain.nii", 2)]
    assert keyed(latest) == keyed(window_over(runs))

    # --rescore-all supersedes everything; --retain-runs expires the folded runs' folders.
    m4 = main(config(input=src, model=tiny_artifact, output=out, rescore_all=True))
    runs.append(new_rows(out, m4))
    m5 = main(config(input=src, model=tiny_artifact, output=out, retain_runs=2))
    assert m5["rows"] == 0
    assert [m["run_id"] for m in ledger.completed_runs(out)] == [m4["run_id"], m5["run_id"]]
    assert not any(f"run_id={m1['run_id']}" in f for f in storage.list_files(out))
    latest = ledger.visible_rows(out)
    assert keyed(latest) == keyed(window_over(runs))
    assert {r["run_id"] for r in latest.to_pylist() if not r["superseded"]} == {m4["run_id"]}
    assert sum(not r["superseded"] for r in latest.to_pylist()) == 12 + 1 + 2


def test_one_writer_per_output(s3_and_ray, tiny_artifact, tmp_path, monkeypatch, lease_waiting):
    from jobs.score import main

    src, out = tmp_path / "in", str(tmp_path / "out")
    src.mkdir()
    for i in range(6):
        (src / f"img{i}.png").write_bytes(png(i))

    # A run that crashed holding the lease (no heartbeat, a half-written folder): once it expires, the next
    # proceeds. Its TTL is far longer than the refused run below takes to reach the lease.
    crashed = leases.acquire(out, "20000101T000000Z-dead0000", ttl_s=10.0)
    crashed._stop.set()
    crashed._thread.join()
    dead = tmp_path / "out/run_date=2000-01-01/run_id=20000101T000000Z-dead0000"
    dead.mkdir(parents=True)
    (dead / "part-00000.parquet").write_bytes(b"partial")
    with pytest.raises(SystemExit, match="being scored by run 20000101T000000Z-dead0000"):
        main(config(input=str(src), model=tiny_artifact, output=out))
    deadline = time.monotonic() + 60
    while leases.current_holder(out) is not None:  # until its recorded expiry has passed
        assert time.monotonic() < deadline, "the crashed run's lease never expired"
        time.sleep(0.1)

    # Two runs at once: the first scores, then holds the lease at its commit until the test lets it go;
    # the second is refused at once; a third waits its turn.
    commit = threading.Event()
    write_manifest = ledger.write_manifest

    def held_commit(*args, **kwargs):
        if threading.current_thread().name == "first":
            assert commit.wait(240), "the test never let the first run commit"
        return write_manifest(*args, **kwargs)

    monkeypatch.setattr(ledger, "write_manifest", held_commit)
    results, errors = {}, {}

    def run(name, **kw):
        try:
            results[name] = main(config(input=str(src), model=tiny_artifact, output=out, **kw))
        except SystemExit as e:
            errors[name] = str(e)

    first = threading.Thread(target=run, args=("first",), name="first")
    third = threading.Thread(target=run, args=("third",), kwargs={"wait_for_lease": 300.0}, name="third")
    try:
        first.start()
        deadline = time.monotonic() + 120
        while (leases.current_holder(out) or {}).get("run_id") in (None, "20000101T000000Z-dead0000"):
            assert first.is_alive() and time.monotonic() < deadline, errors
            time.sleep(0.1)
        run("second")
        assert "being scored by run" in errors["second"] and "--wait-for-lease" in errors["second"]
        third.start()
        assert lease_waiting.wait(120), "the third run did not wait for the lease"
        assert first.is_alive() and "third" not in results
    finally:
        commit.set()
        first.join(240)
        third.join(240)
    assert set(results) == {"first", "third"}, errors
    assert results["first"]["rows"] == 6 and results["third"]["rows"] == 0 and results["third"]["skipped_files"] == 6
    assert not dead.exists()  # the dead run's folder is gone, the live runs' are not
    assert [m["run_id"] for m in ledger.completed_runs(out)] == [results["first"]["run_id"], results["third"]["run_id"]]
    latest = ledger.visible_rows(out)
    assert latest.num_rows == 6 and len(set(latest.column("image_uri").to_pylist())) == 6

"""Every S3 operation of adcore outlasts a store that throttles half of all requests.

Real parts: the moto server behind the fault proxy of ``tests/faults_proxy.py``. The AWS SDK's
own retries give up under sustained throttling (their quota runs out); these operations must not.
"""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from adcore import s3retry, storage
from tests.faults_proxy import FaultProxy


@pytest.fixture
def throttled(s3_server, monkeypatch):
    """A bucket reached through a proxy that answers 503 SlowDown to half of all requests."""
    bucket = s3_server.make_bucket("retry-half")
    monkeypatch.setattr(s3retry, "BACKOFF_S", 0.01)  # the behaviour, not the pacing, is under test
    with FaultProxy(s3_server.endpoint, share=0.5, seed=3, methods=("GET", "PUT", "POST", "HEAD", "DELETE")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield bucket, proxy


def test_reads_writes_listings_and_deletes_succeed_at_half_the_requests_throttled(throttled):
    bucket, proxy = throttled
    table = pa.table({"x": np.arange(5000), "y": np.random.default_rng(0).random(5000)})
    for i in range(6):
        uri = f"{bucket}/t/part-{i:02d}.parquet"
        fs, path = storage.filesystem_for(uri)
        pq.write_table(table, path, filesystem=fs)
        assert pq.read_table(path, filesystem=fs).equals(table)
        storage.write_bytes(f"{bucket}/b/{i:02d}.bin", bytes([i]) * 1000)
        assert storage.read_bytes(f"{bucket}/b/{i:02d}.bin") == bytes([i]) * 1000
    assert len(storage.list_files(f"{bucket}/t")) == 6
    fs, path = storage.filesystem_for(f"{bucket}/b")
    fs.delete_dir_contents(path)
    assert storage.list_files(bucket, suffixes=[".bin"]) == []
    assert sum(proxy.faults.values()) > 20  # the store really throttled


def test_a_missing_object_is_not_retried(throttled):
    bucket, proxy = throttled
    proxy.share = 0.0
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{bucket}/nothing-here.png")
    assert sum(n for (m, p), n in proxy.requests.items() if "nothing-here" in p) == 1


def test_an_upload_that_fails_its_attempts_leaves_no_object(throttled, monkeypatch):
    bucket, proxy = throttled
    proxy.share = 1.0
    monkeypatch.setattr(s3retry, "ATTEMPTS", 3)
    monkeypatch.setattr(s3retry, "BACKOFF_S", 0.0)
    with pytest.raises(OSError, match="SlowDown"):
        storage.write_bytes(f"{bucket}/never.bin", b"x" * 100)
    proxy.share = 0.0
    assert not storage.exists(f"{bucket}/never.bin")
    assert proxy.faults["PUT"] == 3


def test_the_filesystem_pickles_without_a_client_or_credential(throttled):
    fs, _ = storage.filesystem_for(f"{throttled[0]}/x")
    data = pickle.dumps(fs)
    assert b"testing-secret" not in data and b"testing-key" not in data
    assert pickle.loads(data) == fs


def test_transient_errors_are_told_apart():
    assert s3retry.is_transient(OSError("AWS Error SLOW_DOWN during GetObject operation"))
    assert s3retry.is_transient(OSError("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation"))
    assert not s3retry.is_transient(FileNotFoundError("AWS Error SLOW_DOWN"))
    assert not s3retry.is_transient(OSError("AWS Error ACCESS_DENIED during GetObject operation"))
    assert not s3retry.is_transient(ValueError("timed out"))
    assert isinstance(storage.filesystem_for("/tmp/x")[0], pafs.LocalFileSystem)

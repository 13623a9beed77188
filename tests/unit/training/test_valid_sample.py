"""Validation reads only the images it uses: from S3 a node copies the sampled files, never the prefix."""

from __future__ import annotations

import numpy as np

from adcore import storage
from adcore.data.demo import make_demo_dataset
from adcore.training.loop import load_split
from adcore.training.stream import sampled_files
from jobs.train import JobConfig, worker_data
from tests.faults_proxy import FaultProxy

MAX_VALID = 4


def test_a_node_reads_only_the_sampled_validation_images(s3_server, tmp_path, monkeypatch):
    data = make_demo_dataset(tmp_path / "demo", n_train=4, n_valid=16, n_test=2, size=32, seed=0)
    bucket = s3_server.make_bucket("valid-sample")
    storage.upload_dir(data, f"{bucket}/data")
    monkeypatch.setenv("ADCORE_CACHE_DIR", str(tmp_path / "cache"))
    job = JobConfig(data=f"{bucket}/data", output=str(tmp_path / "model"))
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        files = sampled_files(job.data, "valid", MAX_VALID)  # the driver: a LIST, no image read
        assert proxy.read("/data/valid/") == set()
        folder = worker_data(job, {"valid_files": files})
        again = worker_data(job, {"valid_files": files})  # a second worker on the node: the same copy
        read = proxy.read("/data/valid/")
        gets = proxy.gets("/data/valid/")
    assert again == folder
    images = [f for f in files if "/img/" in f or "/good/" in f]
    assert len(images) == MAX_VALID and len(files) > MAX_VALID, "the sample's images and its anomalies' masks"
    assert read == {f"/valid-sample/data/{f}" for f in files} and gets == len(files), "each sampled file read once"
    expected, copied = load_split(str(data), "valid", MAX_VALID), load_split(folder, "valid", MAX_VALID)
    assert [s.path.relative_to(data) for s in expected["samples"]] == [
        s.path.relative_to(folder) for s in copied["samples"]
    ]
    np.testing.assert_array_equal(copied["labels"], expected["labels"])
    assert 0 < copied["labels"].sum() < MAX_VALID, "both classes in the sample"
    for a, b in zip(copied["images"], expected["images"]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(copied["masks"], expected["masks"]):
        np.testing.assert_array_equal(a, b)

"""Fixtures shared by every test: a local S3 server and a seeded random generator."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import pytest

# Offline and quiet: no usage reports, no model-hub downloads.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Dummy credentials for the local moto server only.
_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@dataclass
class S3Server:
    """A running S3 endpoint on 127.0.0.1."""

    endpoint: str

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if it exists) and return ``s3://name``."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server for the session, with the AWS_* variables pointing at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint=endpoint)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> str:
    """Path of a saved tiny fusion-small artifact (random-init towers), shared by the session."""
    from adcore.testing import tiny_artifact as make

    return make(tmp_path_factory.mktemp("artifact") / "fusion-small-tiny")


# The interpreter's own teardown after the last test once ended in a segmentation fault in CI
# (after "308 passed", exit 139): native libraries loaded into this one long-lived process (Ray's
# core worker, onnxruntime, FAISS, pyarrow's S3 client, gRPC) finalise in an order none of them
# controls. The jobs themselves run in their own processes, whose exit codes the tests check. So the
# test process ends with the session's own exit status as soon as pytest is done with it.
_SESSION_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _SESSION_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _SESSION_STATUS and not hasattr(config, "workerinput"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_SESSION_STATUS[-1])

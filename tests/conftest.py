"""Fixtures shared by every test (a local S3 server, a seeded random generator) and the test tiers.

Tiers, by marker (``make unit`` runs ``-m unit``, ``make test`` everything):

- ``integration``: real local services: every test under ``tests/integration`` and every test that
  starts the S3 server (the ``s3_server`` fixture).
- ``slow``: training runs, ONNX exports, gloo process groups, subprocess jobs: marked in the files.
- ``unit``: every other test under ``tests/unit`` (set here), the fast tier.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# Offline and quiet: no usage reports, no model-hub downloads.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata here: never wait on it
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


_TESTS = Path(__file__).resolve().parent
# Tests that need local services by fixture name, wherever their file lives.
_SERVICE_FIXTURES = {"s3_server", "ray_local"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = item.path.resolve().relative_to(_TESTS).parts[0]
        if folder == "integration" or _SERVICE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)
        if folder == "unit" and not any(item.get_closest_marker(name) for name in ("integration", "slow")):
            item.add_marker(pytest.mark.unit)


# Every extra the suite needs is installed by `make setup`: a skip for a missing module, or any
# other skip, hides a subsystem from CI. Only optional hardware may skip a test.
_OPTIONAL_SKIP = re.compile(r"\b(GPU|CUDA)\b")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


def _fail_unless_optional(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not _OPTIONAL_SKIP.search(reason):
            report.outcome = "failed"
            report.longrepr = f"skipped without an optional-hardware reason (the suite needs it run): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unless_optional(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_unless_optional(outcome.get_result())


class _LeaseWaitSeen(logging.Handler):
    """Sets ``seen`` when a run logs that it waits for another run's lease."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seen = threading.Event()

    def emit(self, record):
        if record.getMessage().startswith("waiting for run"):
            self.seen.set()


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after_each_file():
    """Each test file starts from a process without Ray: a file whose job or fixture left the
    driver connected (an in-process job's ``ray.init``) would make the next file's ``ray.init``
    fail. Which files share a process depends on how the suite is split over workers."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def lease_waiting() -> threading.Event:
    """An event set once a scoring run waits for the output's lease (instead of a guessed delay)."""
    from jobs.scoring import lease

    handler, level = _LeaseWaitSeen(), lease.log.level
    lease.log.addHandler(handler)
    lease.log.setLevel(logging.INFO)
    yield handler.seen
    lease.log.removeHandler(handler)
    lease.log.setLevel(level)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """``get(preset, version)``: the path of a saved tiny artifact of that family (random-init towers),
    made once per test run and shared by the run's worker processes (``tests/artifact_cache.py``); its
    engine cache (ONNX graphs) is shared too. Tests must not modify it."""
    from tests.artifact_cache import shared_tiny_artifact

    root = run_root(tmp_path_factory)
    return lambda preset="fusion-small", version=1: shared_tiny_artifact(root, preset, version)


def run_root(tmp_path_factory) -> Path:
    """A folder of this test run that every pytest-xdist worker of the run shares (each worker's own
    base folder lies inside the run's)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_artifact(tiny_artifacts) -> str:
    """Path of the session's tiny fusion-small artifact."""
    return tiny_artifacts()


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

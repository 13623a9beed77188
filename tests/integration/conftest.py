"""Fixtures of the integration tests."""

from __future__ import annotations

import contextlib
import os

import pytest

from jobs.scoring import dicomweb
from jobs.scoring.schema import SECRET_ENV
from tests.orthanc import Orthanc, missing

# The study-key secret of the module's cluster: Ray workers read it from their own environment,
# which a local cluster's workers inherit from the process that started it (as on a real node).
STUDY_SECRET = "integration-study-secret-of-at-least-32-bytes"
# The PACS account of the tests' Orthanc (HTTP basic): it must reach the server, and no log or pickle.
USER, PASSWORD = "adcore-night", "pacs-password-never-logged-7f3a"


@contextlib.contextmanager
def nodes_environment():
    """The environment Ray nodes started inside this block give their workers: the study secret
    (each test sets the driver's own)."""
    saved = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = STUDY_SECRET
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(SECRET_ENV)
        else:
            os.environ[SECRET_ENV] = saved


@pytest.fixture(scope="module")
def ray_local():
    """A local two-CPU Ray for the module's jobs (drivers in this process)."""
    import ray

    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-score")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    with nodes_environment():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pacs_credentials():
    """The PACS credentials in the environment before the module's Ray starts (its workers inherit it):
    name it in ``pytest.mark.usefixtures`` of the module, so it comes before ``ray_local``."""
    saved = {k: os.environ.get(k) for k in (dicomweb.USER_ENV, dicomweb.PASSWORD_ENV)}
    os.environ[dicomweb.USER_ENV], os.environ[dicomweb.PASSWORD_ENV] = USER, PASSWORD
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def orthanc(tmp_path, pacs_credentials):
    """A real Orthanc that demands the credentials, for one test."""
    if missing():
        pytest.fail(missing())
    with Orthanc(tmp_path / "orthanc", users={USER: PASSWORD}) as server:
        yield server

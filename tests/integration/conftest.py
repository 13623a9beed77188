"""Fixtures of the integration tests."""

from __future__ import annotations

import contextlib
import os

import pytest

from jobs.scoring.schema import SECRET_ENV

# The study-key secret of the module's cluster: Ray workers read it from their own environment,
# which a local cluster's workers inherit from the process that started it (as on a real node).
STUDY_SECRET = "integration-study-secret-of-at-least-32-bytes"


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

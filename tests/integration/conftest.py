"""Fixtures of the integration tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A local two-CPU Ray for the module's jobs (drivers in this process)."""
    import ray

    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-score")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()

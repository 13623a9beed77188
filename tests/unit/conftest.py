"""The fast tier stays fast: a test marked ``unit`` whose setup, call or teardown (its fixtures'
included) trains, exports ONNX, joins a process group or starts Ray fails and says which marker it
needs (``slow`` or ``integration``; tiers in tests/conftest.py)."""

from __future__ import annotations

import sys

import pytest


def _refuse(what: str, marker: str):
    def guard(*args, **kwargs):
        pytest.fail(f"a unit-tier test ran {what}: mark it {marker} (pytest.mark.{marker})", pytrace=False)

    return guard


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("unit") is None:
        yield
        return
    import torch

    from adcore.training import loop

    with pytest.MonkeyPatch.context() as patch:
        # train() ends in a calibration fit, through the loop module's own name for it.
        patch.setattr(loop, "fit_calibration", _refuse("a training run (adcore.training.train)", "slow"))
        patch.setattr(torch.onnx, "export", _refuse("an ONNX export", "slow"))
        patch.setattr(torch.distributed, "init_process_group", _refuse("a process group", "slow"))
        if "ray" in sys.modules:
            patch.setattr(sys.modules["ray"], "init", _refuse("ray.init", "integration"))
        yield


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _no_ray_left_running(request):
    before = _ray_running()
    yield
    if request.node.get_closest_marker("unit") and not before and _ray_running():
        pytest.fail("a unit-tier test started Ray: mark it integration", pytrace=False)

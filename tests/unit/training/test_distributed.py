"""The loop under a real process group (two gloo processes) and resume from a checkpoint.

No Ray here: ``adcore.training.train`` with ``TrainHooks`` wired to a ``torch.distributed``
group, as ``jobs/train.py`` wires them to Ray Train's.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adcore.data.demo import make_demo_dataset
from adcore.training import TrainConfig, TrainHooks, dist, train
from adcore.training.loop import load_split

# A hang is what this guards against: fail well before CI's own timeout.
HANG_S = 240
pytestmark = pytest.mark.timeout(HANG_S + 60)


@pytest.fixture(scope="module")
def seventeen(tmp_path_factory) -> str:
    """17 training images: strided over 2 ranks they are 9 and 8, i.e. 2 and 1 batches of 8."""
    root = tmp_path_factory.mktemp("seventeen")
    return str(make_demo_dataset(root, n_train=17, n_valid=4, n_test=2, size=64, seed=5))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, data: str, out: str, minutes: float) -> None:
    """One rank: a gloo group, DDP wrapping, train(); writes what it reported."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    reports = []

    def wrap(module):
        kwargs = {"find_unused_parameters": dist.needs_unused_parameter_search(module)}
        return torch.nn.parallel.DistributedDataParallel(module, **kwargs)

    hooks = TrainHooks(
        rank=rank,
        world_size=world,
        device="cpu",
        wrap=wrap,
        report=lambda metrics, state: reports.append({k: metrics[k] for k in ("stage", "epoch", "steps")}),
    )
    # Clock skew at its worst: rank 0's budget is spent by its first step, rank 1's never would be.
    paper = "fusion-small-paper"  # both stages
    cfg = TrainConfig(paper, tiny=True, epochs=3, domain_epochs=2, batch_size=8, minutes=minutes if rank == 0 else 30.0)
    scorer = train(data, cfg, output=os.path.join(out, "art") if rank == 0 else None, hooks=hooks)
    shard = len(load_split(data, "train", None, rank, world)["images"])
    result = {"reports": reports, "shard": shard, "version": scorer.version}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_workers_uneven_data_and_budget_finish(seventeen, tmp_path):
    """17 images, batch 8, a time budget one rank exhausts first: both ranks stop together, no hang."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_gloo_worker, args=(rank, 2, port, seventeen, str(tmp_path), 0.0), daemon=True)
        for rank in range(2)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + HANG_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {HANG_S} s: the ranks' collective calls diverged"
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["shard"] == ranks[1]["shard"] == 9, "equal shards: 17 images padded to 18"
    assert ranks[0]["reports"] == ranks[1]["reports"], "same epochs and steps on both ranks"
    # Rank 0's budget is zero (spent by any step, however fast): every stage stops after its first step.
    assert ranks[0]["reports"] == [
        {"stage": "domain", "epoch": 1, "steps": 1},
        {"stage": "fusion", "epoch": 1, "steps": 1},
    ]
    assert (tmp_path / "art" / "manifest.json").is_file()


def _agree_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = np.full((rank + 1, 3), rank, np.float32)  # 1 row on rank 0, 2 on rank 1
    result = {
        "stop": dist.agree_stop(rank == 1, world),
        "go": dist.agree_stop(False, world),
        "min": dist.min_int(10 + rank, world),
        "mean": dist.mean(float(rank) if rank else float("nan"), world),
        "gathered": dist.gather_arrays(rows, world).tolist(),
    }
    Path(out, f"agree{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_collectives_agree_across_ranks(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_agree_worker, args=(rank, 2, port, str(tmp_path)), daemon=True) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(HANG_S)
        assert p.exitcode == 0
    for rank in range(2):
        got = json.loads((tmp_path / f"agree{rank}.json").read_text())
        assert got["stop"] is True and got["go"] is False
        assert got["min"] == 10
        assert got["mean"] == 1.0, "a rank that measured nothing (NaN) is left out of the mean"
        assert got["gathered"] == [[0, 0, 0], [1, 1, 1], [1, 1, 1]]


# ---- resume ----


def _through_disk(state: dict) -> dict:
    """What a checkpoint gives back: torch.save, then torch.load(weights_only=True) as jobs/train.py does."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


class _Crash(RuntimeError):
    pass


def _epochs(reports: list[dict]) -> list[tuple[str, int]]:
    return [(m["stage"], m["epoch"]) for m in reports]


def _losses(reports: list[dict]) -> list[float]:
    return [m["loss"] for m in reports]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    return str(make_demo_dataset(tmp_path_factory.mktemp("small"), n_train=12, n_valid=4, n_test=2, size=64, seed=2))


# Warm-up over half the steps: a resumed run that restarted its schedule would show it in the losses.
RESUME_CFG = dict(
    preset="fusion-small-paper",
    tiny=True,
    smoke_test=True,
    epochs=3,
    domain_epochs=2,
    batch_size=4,
    warmup_share=0.5,
    seed=1,
)


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [("domain", 1), ("fusion", 2)])
def test_resumed_run_continues_the_losses_of_an_uninterrupted_one(small, stop_after):
    """Crash after an epoch of stage 1 or 2, resume from that checkpoint: the same per-epoch losses follow."""
    full: list[dict] = []
    train(small, TrainConfig(**RESUME_CFG), hooks=TrainHooks(report=lambda m, s: full.append(m)))

    first: list[dict] = []
    saved: dict = {}

    def crash_after(metrics, state):
        first.append(metrics)
        if (metrics["stage"], metrics["epoch"]) == stop_after:
            saved.update(_through_disk(state()))
            raise _Crash("injected failure after a checkpoint")

    with pytest.raises(_Crash):
        train(small, TrainConfig(**RESUME_CFG), hooks=TrainHooks(report=crash_after))
    assert saved["stage"] == stop_after[0] and saved["epoch"] == stop_after[1]
    assert {"optimizer", "scheduler", "scaler", "rng", "model", "history"} <= set(saved)

    second: list[dict] = []
    train(small, TrainConfig(**RESUME_CFG), hooks=TrainHooks(report=lambda m, s: second.append(m), resume=saved))
    assert _epochs(first) + _epochs(second) == _epochs(full)
    assert _losses(first) + _losses(second) == pytest.approx(_losses(full), rel=1e-6), (
        "the resumed run's losses differ from the uninterrupted run's"
    )


def _epoch_ends(reports: list[dict]) -> list[dict]:
    return [m for m in reports if "step" not in m]


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [("domain", 1, 1), ("fusion", 2, 1)])
def test_run_resumed_inside_an_epoch_continues_at_the_same_batch_with_the_same_losses(small, stop_at):
    """Checkpoints by time (here after every step): crash after a checkpoint inside an epoch, resume from
    it: the epoch goes on from the next batch, and every epoch's loss is the uninterrupted run's."""
    cfg = TrainConfig(**RESUME_CFG, checkpoint_every_min=0.0)
    full: list[dict] = []
    train(small, cfg, hooks=TrainHooks(report=lambda m, s: full.append(m)))
    inside = [(m["stage"], m["epoch"], m["step"]) for m in full if "step" in m]
    assert stop_at in inside, f"no checkpoint inside an epoch: {inside}"
    assert _epoch_ends(full) and all(m["step"] < m["steps"] for m in full if "step" in m)

    first: list[dict] = []
    saved: dict = {}

    def crash_at(metrics, state):
        first.append(metrics)
        if (metrics["stage"], metrics["epoch"], metrics.get("step")) == stop_at:
            saved.update(_through_disk(state()))
            raise _Crash("injected failure after a checkpoint inside an epoch")

    with pytest.raises(_Crash):
        train(small, cfg, hooks=TrainHooks(report=crash_at))
    assert saved["stage"] == stop_at[0] and saved["epoch"] == stop_at[1] - 1 and saved["step"] == stop_at[2]

    second: list[dict] = []
    train(small, cfg, hooks=TrainHooks(report=lambda m, s: second.append(m), resume=saved))
    assert _epochs(_epoch_ends(first) + _epoch_ends(second)) == _epochs(_epoch_ends(full))
    assert _losses(_epoch_ends(first) + _epoch_ends(second)) == pytest.approx(_losses(_epoch_ends(full)), rel=1e-6), (
        "the run resumed inside an epoch has other losses than the uninterrupted run"
    )


@pytest.mark.slow
def test_stage_one_checkpoint_skips_stage_one_when_done(small):
    states = []
    train(small, TrainConfig(**{**RESUME_CFG, "epochs": 1}), hooks=TrainHooks(report=lambda m, s: states.append(s())))
    domain_done = states[RESUME_CFG["domain_epochs"] - 1]
    assert domain_done["stage"] == "domain" and domain_done["stages_done"] == ["domain"]
    assert any(k.startswith("domain_head.") for k in domain_done["model"]), "stage 1's weights are checkpointed"
    seen = []
    hooks = TrainHooks(report=lambda m, s: seen.append(m), resume=domain_done)
    train(small, TrainConfig(**{**RESUME_CFG, "epochs": 1}), hooks=hooks)
    assert [(m["stage"], m["epoch"]) for m in seen] == [("fusion", 1)]


@pytest.mark.slow
def test_old_checkpoint_layout_starts_afresh(small, caplog):
    seen = []
    old = {"stage": 1, "epoch": 1, "model": {}, "history": []}  # what the loop wrote before format 2
    hooks = TrainHooks(report=lambda m, s: seen.append(m), resume=old)
    train(small, TrainConfig(**{**RESUME_CFG, "epochs": 1}), hooks=hooks)
    assert [(m["stage"], m["epoch"]) for m in seen] == [("domain", 1), ("domain", 2), ("fusion", 1)]
    assert "older layout" in caplog.text


def test_module_asks_for_unused_parameter_search():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert not dist.needs_unused_parameter_search(net)
    setattr(net[1], dist.FIND_UNUSED_ATTR, True)
    assert dist.needs_unused_parameter_search(net)


def test_device_resolution_and_autocast_choice():
    from adcore.training.stages import autocast_settings

    assert dist.resolve_device("cpu") == torch.device("cpu")
    assert dist.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert autocast_settings(torch.device("cpu"), True) == (None, False), "no autocast on CPU"
    if torch.cuda.is_available():
        dtype, scaler = autocast_settings(torch.device("cuda"), True)
        assert (dtype, scaler) in ((torch.bfloat16, False), (torch.float16, True))
        assert autocast_settings(torch.device("cuda"), False) == (None, False)
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            dist.resolve_device("cuda")

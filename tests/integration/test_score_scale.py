"""The scoring job on a simulated multi-node cluster with fake GPUs: replicas everywhere, writes off the driver."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from tests.integration.test_score_job import _png, visible

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

N_IMAGES = 96
GPU_NODES = 2
WAIT_FOR_REPLICAS_S = 300  # far longer than a refusal from the plan takes, even on a loaded machine


@pytest.fixture
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-scale")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs no tasks
    nodes = [c.add_node(num_cpus=2, num_gpus=1) for _ in range(GPU_NODES)]  # fake GPUs: no CUDA behind them
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def _archive(root, n: int) -> str:
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(n):
        (root / f"img{i:03d}.png").write_bytes(_png((rng.random((40, 48)) * 255).astype(np.uint8)))
    return str(root)


def _config(**kw):
    from jobs.score import ScoreConfig

    return ScoreConfig(
        **({"batch_size": 2, "files_per_block": 4, "progress_every_s": 0.5, "wait_for_replicas_s": 60} | kw)
    )


def test_replicas_on_every_gpu_node_and_exactly_one_row_per_image(cluster, tiny_artifact, tmp_path):
    from jobs.score import main

    c, _ = cluster
    inp, out = _archive(tmp_path / "in", N_IMAGES), str(tmp_path / "out")
    # A model call of 0.3 s: slower than decoding, as real networks are, so work reaches every replica.
    m = main(_config(input=inp, model=tiny_artifact, output=out, ray_address=c.address, simulated_batch_s=0.3))
    assert m["rows"] == N_IMAGES and m["counts"]["ok"] == N_IMAGES
    assert m["replicas"]["max"] == GPU_NODES and m["replicas"]["gpus"] == 1.0
    assert len(m["rows_by_node"]) == GPU_NODES, f"rows scored on {m['rows_by_node']}"
    assert sum(m["rows_by_node"].values()) == N_IMAGES
    rows, _ = visible(out)
    assert sorted(r["image_uri"] for r in rows) == sorted(str(p) for p in (tmp_path / "in").iterdir())


def test_unplaceable_requests_fail_at_once(cluster, tiny_artifact, tmp_path):
    from jobs.score import main

    c, _ = cluster
    inp = _archive(tmp_path / "in", 2)
    # Refused from the plan, before the pipeline starts: never after waiting out the replicas' deadline.
    kw = dict(input=inp, model=tiny_artifact, ray_address=c.address, wait_for_replicas_s=WAIT_FOR_REPLICAS_S)
    t0 = time.monotonic()
    with pytest.raises(SystemExit, match="no node can hold"):
        main(_config(output=str(tmp_path / "o1"), cpus_per_replica=4, **kw))
    with pytest.raises(SystemExit, match="holds 2"):
        main(_config(output=str(tmp_path / "o2"), replicas="3", **kw))
    assert time.monotonic() - t0 < WAIT_FOR_REPLICAS_S


def _replica_working_on(node, out) -> bool:
    """A model replica on ``node`` has started (it holds the node's fake GPU and its actor is alive)
    while the run writes rows: from here on that replica is sent batches."""
    from ray._private.state import actors, available_resources_per_node

    available = available_resources_per_node()  # a resource fully in use is left out of its node's entry
    if node.node_id not in available or available[node.node_id].get("GPU", 0.0) > 0.0:
        return False
    on_node = [a for a in actors().values() if a["Address"]["NodeID"] == node.node_id and a["State"] == "ALIVE"]
    return any("ScoreStage" in a["ActorClassName"] for a in on_node) and any(out.glob("run_date=*/run_id=*/part-*"))


def test_a_node_removed_mid_run_loses_and_duplicates_nothing(cluster, tiny_artifact, tmp_path):
    """A node that holds a working replica goes mid-run: Ray Data retries its tasks on the other node and
    the run commits every image exactly once."""
    import ray

    from jobs.score import main

    c, nodes = cluster
    inp, out = _archive(tmp_path / "in", N_IMAGES), tmp_path / "out"
    cfg = _config(
        input=inp,
        model=tiny_artifact,
        output=str(out),
        ray_address=c.address,
        replicas="1:2",
        simulated_batch_s=0.3,
        rows_per_file=4,  # rows reach the output while the replicas score
    )
    result: dict = {}

    def run():
        try:
            result["m"] = main(cfg)
        except BaseException as e:  # noqa: BLE001 (reported by the assertion below)
            result["error"] = e

    job = threading.Thread(target=run)
    job.start()
    deadline = time.monotonic() + 240
    working: list = []
    while not working:  # whichever node holds a working replica goes, once it does
        assert job.is_alive() and time.monotonic() < deadline, f"no replica was seen working: {result}"
        time.sleep(0.1)
        if ray.is_initialized():
            working = [n for n in nodes if _replica_working_on(n, out)]
    c.remove_node(working[-1])
    job.join(timeout=300)
    assert not job.is_alive(), "the run hangs after losing a node"
    assert "m" in result, f"the run failed after losing a node: {result.get('error')!r}"
    m = result["m"]
    assert m["rows"] == N_IMAGES and m["counts"] == {"ok": N_IMAGES, "error": 0}
    rows, raw = visible(str(out))
    assert raw.num_rows == N_IMAGES, "a retried task wrote its rows twice"
    assert sorted(r["image_uri"] for r in rows) == sorted(str(p) for p in (tmp_path / "in").iterdir())

"""Benchmark: the scoring job's orchestration on simulated nodes, with 1, 2 and 4 model replicas.

    .venv/bin/python bench/score_scale.py [--n 192] [--batch-s 0.5]

Each replica's model call sleeps ``--batch-s`` per batch (``ScoreConfig.simulated_batch_s``), so
throughput measures the pipeline around the model: with R replicas on R fake-GPU nodes the
ideal is R times the 1-replica rate. Also prints the object-store bytes per image of the
frames the decoder ships (uint8 now, float32 before). Ratios, side by side in one run.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from adcore.cli import parse_config
from adcore.testing import tiny_artifact


@dataclass
class ScaleBenchConfig:
    n: int = 384  # images scored per run
    batch_s: float = 0.5  # simulated model time per batch
    batch_size: int = 4
    replicas: str = "1,2,4"  # replica counts to compare (one fake-GPU node each)


def _archive(root: pathlib.Path, n: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(root / f"img{i:05d}.png")
    return str(root)


def run(replicas: int, cfg: ScaleBenchConfig, inp: str, model: str, work: pathlib.Path) -> float:
    """Steady rows/s (after the first file is written) of one job run on ``replicas`` fake-GPU nodes."""
    import ray
    from ray.cluster_utils import Cluster

    from jobs.score import ScoreConfig, main

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(replicas):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    try:
        t0 = time.monotonic()
        m = main(
            ScoreConfig(
                input=inp,
                model=model,
                output=str(work / f"out{replicas}"),
                ray_address=cluster.address,
                batch_size=cfg.batch_size,
                files_per_block=4,
                simulated_batch_s=cfg.batch_s,
                progress_every_s=1e9,
            )
        )
        wall = time.monotonic() - t0
        assert m["rows"] == cfg.n and m["counts"]["error"] == 0, m
        print(
            f"replicas {replicas}: {m['rows'] / wall:.2f} rows/s whole job, steady {m['steady_rows_per_s']} rows/s, "
            f"rows by node {sorted(m['rows_by_node'].values())}",
            flush=True,
        )
        return m["steady_rows_per_s"]
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(cfg: ScaleBenchConfig) -> None:
    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-bench")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    work = pathlib.Path(tempfile.mkdtemp(prefix="adcore-scale-"))
    try:
        inp = _archive(work / "in", cfg.n)
        model = tiny_artifact(str(work / "model"))
        counts = [int(r) for r in cfg.replicas.split(",")]
        rates = {r: run(r, cfg, inp, model, work) for r in counts}
        base = rates[counts[0]] / counts[0]
        for r in counts:
            print(f"{r} replica(s): {rates[r]:.2f} rows/s = {rates[r] / (base * r):.2f} of linear")
        from adcore.scorer import prepare, to_uint8

        size = 224  # fusion-small / PatchCore input size
        frame = prepare(np.zeros((512, 512), np.float32), size)
        print(
            f"object-store bytes per frame at {size} px: float32 {np.ascontiguousarray(frame).nbytes}, "
            f"uint8 {to_uint8(frame).nbytes} ({np.ascontiguousarray(frame).nbytes / to_uint8(frame).nbytes:.0f}x less)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(parse_config(ScaleBenchConfig, None, __doc__.split("\n")[0]))

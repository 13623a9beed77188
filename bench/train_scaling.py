"""Benchmark jobs/train.py: samples/s with 1 vs 2 workers, and where the wall time goes.

Runs on two simulated Ray nodes (1 CPU each) on this machine, on a generated demo
dataset, and prints per run: wall time, gradient samples/s (end to end and compute
only), and the share of wall time in Ray startup, reporting + checkpointing, data
staging, the library's own compute, and finishing (head, calibration, artifact,
teardown). On a 2-core machine shared with other work, scaling cannot show; the
numbers are printed as measured.

    .venv/bin/python bench/train_scaling.py [--n-train 96] [--epochs 5] [--no-tiny]
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass

# Measured: cuts the wait of each ray.train.report from up to 2 s to about 0.2 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from adcore.cli import parse_config
from adcore.data.demo import make_demo_dataset
from adcore.training import TrainConfig
from jobs import train as train_job

WORKER_COUNTS = (1, 2)  # one per simulated node at most


@dataclass
class BenchConfig:
    n_train: int = 96  # training images; each gradient epoch sees all of them once
    image_size: int = 64  # demo images (the tiny model resizes to its own input size)
    epochs: int = 5  # stage-2 epochs (plus TrainConfig.domain_epochs of stage 1)
    batch_size: int = 8
    preset: str = "fusion-small"
    tiny: bool = True  # the preset's tiny variant: the full one needs minutes per epoch on 2 cores


def run_once(cluster_address: str, data: str, work: pathlib.Path, workers: int, bench: BenchConfig) -> dict:
    """One training run; returns the wall-time breakdown in seconds."""
    timings = work / f"timings-{workers}.json"
    job = train_job.JobConfig(
        data=data,
        output=str(work / f"model-{workers}"),
        storage=str(work / "ray"),
        run_name=f"bench-{workers}",
        num_workers=workers,
        address=cluster_address,
        timings=str(timings),
        max_failures=0,
    )
    cfg = TrainConfig(preset=bench.preset, tiny=bench.tiny, epochs=bench.epochs, batch_size=bench.batch_size)
    t0 = time.time()
    train_job.main(job, cfg)
    wall = time.time() - t0
    t = json.loads(timings.read_text())
    startup = t["worker_start_unix"] - t0
    compute = t["worker_s"] - t["report_s"] - t["data_s"]
    samples = bench.n_train * (cfg.domain_epochs + cfg.epochs)
    return {
        "workers": workers,
        "wall_s": wall,
        "samples": samples,
        "startup_s": startup,
        "report_s": t["report_s"],
        "data_s": t["data_s"],
        "compute_s": compute,
        "finish_s": wall - startup - t["worker_s"],
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"{'workers':>7} {'wall s':>7} {'samples/s':>9} {'compute samples/s':>17} "
        f"{'startup':>7} {'report+ckpt':>11} {'data':>5} {'compute':>7} {'finish':>6}"
    )
    for r in rows:
        w = r["wall_s"]
        print(
            f"{r['workers']:>7} {w:>7.1f} {r['samples'] / w:>9.1f} {r['samples'] / r['compute_s']:>17.1f} "
            f"{r['startup_s'] / w:>7.1%} {r['report_s'] / w:>11.1%} {r['data_s'] / w:>5.1%} "
            f"{r['compute_s'] / w:>7.1%} {max(r['finish_s'], 0) / w:>6.1%}"
        )
    one, two = rows[0], rows[-1]
    print(
        f"speed-up 2 vs 1 workers: end to end {one['wall_s'] / two['wall_s']:.2f}x, "
        f"compute only {one['compute_s'] / two['compute_s']:.2f}x (ideal 2x; {os.cpu_count()} CPU cores here)"
    )
    print(
        "ray overhead share of wall time (startup + report/checkpoint + finish): "
        + ", ".join(
            f"{r['workers']} worker(s) {(r['wall_s'] - r['compute_s'] - r['data_s']) / r['wall_s']:.0%}" for r in rows
        )
    )
    print("(finish = head/centroids, calibration, artifact save, then Ray teardown: part compute, part overhead)")


def main(bench: BenchConfig) -> list[dict]:
    import ray
    from ray.cluster_utils import Cluster

    work = pathlib.Path(tempfile.mkdtemp(prefix="rbench", dir="/tmp"))
    if "RAY_TMPDIR" not in os.environ:  # short, for unix socket paths; removed at the end with `work`
        os.environ["RAY_TMPDIR"] = str(work / "ray")
    data = make_demo_dataset(work / "data", n_train=bench.n_train, n_valid=8, n_test=2, size=bench.image_size)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    rows = []
    try:
        cluster.add_node(num_cpus=1)
        for workers in WORKER_COUNTS:
            rows.append(run_once(cluster.address, str(data), work, workers, bench))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main(parse_config(BenchConfig, None, __doc__.split("\n")[0]))

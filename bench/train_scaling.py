"""Benchmark jobs/train.py: samples/s with 1 vs 2 workers, where the wall time goes, and the streamed input.

Runs on two simulated Ray nodes (1 CPU each) on this machine, on a generated demo
dataset, and prints per run: wall time, gradient samples/s (end to end and compute
only), and the share of wall time in Ray startup, reporting + checkpointing, data
staging, the library's own compute, and finishing (head, calibration, artifact,
teardown). On a 2-core machine shared with other work, scaling cannot show; the
numbers are printed as measured.

Then, with one worker, the streamed train split (Ray Data decode tasks, the default) against the
in-memory one (``--no-stream``): compute samples/s of each and their ratio, and the worker's peak
RSS for N and 4N training images (target: growth under 20 % when streamed).

Then the S3 image GETs of a streamed run from a moto S3 server (one worker, a fresh local cluster,
``--s3-epochs`` epochs), counted by the proxy of ``tests/faults_proxy.py``, with the frame cache (the
default) and with ``--no-frame-cache``, as a ratio to the training images (target: at most 1.05x
with the cache).

Last, the head's fit alone (PatchCore, every normal patch) on N and 8N streamed images, each in a
fresh process: its peak RSS (target: at most 1.2x once N's patches exceed ``--fit-max-patches``).

    .venv/bin/python bench/train_scaling.py [--n-train 96] [--epochs 5] [--no-tiny] [--memory-images 96] \
        [--fit-images 1000] [--fit-max-patches 400000] [--s3-images 64] [--s3-epochs 3]
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

# Measured: cuts the wait of each ray.train.report from up to 2 s to about 0.2 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests.faults_proxy counts the S3 GETs

from adcore.cli import parse_config
from adcore.data.demo import make_demo_dataset
from adcore.training import TrainConfig
from adcore.training.fit import FIT_MAX_PATCHES
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
    memory_images: int = 96  # N of the memory rows (N and 4N images; 0: skip the streamed/in-memory part)
    memory_image_size: int = 256  # stored image size of the memory rows (what an in-memory shard holds)
    memory_epochs: int = 2
    fit_images: int = 1000  # N of the head-fit rows (N and 8N images, streamed; 0: skip them)
    fit_preset: str = "patchcore"  # its fit keeps the most: every normal patch of every image
    fit_max_patches: int = FIT_MAX_PATCHES  # --fit-max-patches of the head-fit rows
    s3_images: int = 64  # training images of the S3 GET rows (0: skip them)
    s3_epochs: int = 3  # stage-2 epochs of the S3 GET rows


def run_once(
    cluster_address: str,
    data: str,
    work: pathlib.Path,
    workers: int,
    bench: BenchConfig,
    *,
    stream: bool = True,
    n_train: int | None = None,
    epochs: int | None = None,
    tag: str = "",
) -> dict:
    """One training run; returns the wall-time breakdown in seconds and the worker's peak RSS."""
    name = f"{workers}{tag}"
    timings = work / f"timings-{name}.json"
    job = train_job.JobConfig(
        data=data,
        output=str(work / f"model-{name}"),
        storage=str(work / "ray"),
        run_name=f"bench-{name}",
        num_workers=workers,
        ray_address=cluster_address,
        timings=str(timings),
        max_failures=0,
        stream=stream,
    )
    epochs = epochs or bench.epochs
    cfg = TrainConfig(preset=bench.preset, tiny=bench.tiny, epochs=epochs, batch_size=bench.batch_size)
    t0 = time.time()
    train_job.main(job, cfg)
    wall = time.time() - t0
    t = json.loads(timings.read_text())
    startup = t["worker_start_unix"] - t0
    compute = t["worker_s"] - t["report_s"] - t["data_s"]
    samples = (n_train or bench.n_train) * (cfg.domain_epochs + cfg.epochs)
    return {
        "workers": workers,
        "streamed": t.get("streamed"),
        "peak_rss_mb": t.get("peak_rss_mb"),
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


def memory_rows(cluster_address: str, work: pathlib.Path, bench: BenchConfig) -> list[dict]:
    """One worker, streamed and in memory, on N and 4N images."""
    rows = []
    for n in (bench.memory_images, 4 * bench.memory_images):
        data = make_demo_dataset(
            work / f"data-{n}", n_train=n, n_valid=8, n_test=2, size=bench.memory_image_size, seed=1
        )
        for stream in (True, False):
            tag = f"-{n}-{'stream' if stream else 'memory'}"
            row = run_once(
                cluster_address,
                str(data),
                work,
                1,
                bench,
                stream=stream,
                n_train=n,
                epochs=bench.memory_epochs,
                tag=tag,
            )
            rows.append({**row, "n_train": n})
    return rows


def print_memory(rows: list[dict], bench: BenchConfig) -> None:
    print()
    print(f"one worker, {bench.memory_image_size} px images, {bench.memory_epochs} epochs:")
    print(f"{'images':>7} {'input':>9} {'compute samples/s':>17} {'worker peak RSS MB':>18}")
    for r in rows:
        kind = "streamed" if r["streamed"] else "in-memory"
        print(f"{r['n_train']:>7} {kind:>9} {r['samples'] / r['compute_s']:>17.1f} {r['peak_rss_mb']:>18.0f}")
    by = {(r["n_train"], bool(r["streamed"])): r for r in rows}
    n, n4 = bench.memory_images, 4 * bench.memory_images
    for size in (n, n4):
        s, m = by[(size, True)], by[(size, False)]
        ratio = (s["samples"] / s["compute_s"]) / (m["samples"] / m["compute_s"])
        print(f"streamed / in-memory compute samples/s at {size} images: {ratio:.2f}")
    for streamed in (True, False):
        a, b = by[(n, streamed)]["peak_rss_mb"], by[(n4, streamed)]["peak_rss_mb"]
        kind = "streamed" if streamed else "in-memory"
        print(
            f"{kind} worker peak RSS {n} -> {n4} images: {a:.0f} -> {b:.0f} MB "
            f"({b / a - 1:+.1%}; target < +20 % streamed)"
        )


def _fit_peak_rss(n_images: int, bench: BenchConfig, out) -> None:
    """In a fresh process: the head fit of ``bench.fit_preset`` (tiny) over ``n_images`` streamed
    images (random pixels, made batch by batch: only the fit keeps anything); its peak RSS in MB."""
    import resource

    import numpy as np
    import torch

    from adcore.models import create, family_for
    from adcore.training.fit import FitData
    from adcore.training.stream import StreamedBatches

    torch.manual_seed(0)
    model = create(bench.fit_preset, tiny=True).eval()
    size, batch = model.input_size, bench.batch_size

    def iterate(epoch):
        for start in range(0, n_images, batch):
            rng = np.random.default_rng([epoch, start])
            n = min(batch, n_images - start)
            yield {
                "index": np.arange(start, start + n),
                "pixels": rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8),
                "mask": np.zeros((n, size, size), bool),
                "label": np.zeros(n, np.int8),
            }

    batches = StreamedBatches(iterate, n_images, batch, anomaly_share=0.0)
    t0 = time.monotonic()
    family_for(model).fit(model, FitData(batches, max_patches=bench.fit_max_patches))
    seconds = time.monotonic() - t0
    out.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds, model.grid**2))


def fit_rows(bench: BenchConfig) -> list[dict]:
    """Peak RSS of the head fit on N and 8N training images, each in its own process."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    rows = []
    for n in (bench.fit_images, 8 * bench.fit_images):
        out = ctx.Queue()
        proc = ctx.Process(target=_fit_peak_rss, args=(n, bench, out))
        proc.start()
        rss, seconds, cells = out.get()
        proc.join()
        rows.append({"fit_images": n, "peak_rss_mb": rss, "fit_s": seconds, "patches": n * cells})
    return rows


def print_fit(rows: list[dict], bench: BenchConfig) -> None:
    print()
    print(f"head fit ({bench.fit_preset} tiny, --fit-max-patches {bench.fit_max_patches}):")
    for r in rows:
        rss, secs = r["peak_rss_mb"], r["fit_s"]
        print(f"{r['fit_images']:>7} images {r['patches']:>10} patches: peak RSS {rss:.0f} MB, {secs:.1f} s")
    a, b = rows[0]["peak_rss_mb"], rows[-1]["peak_rss_mb"]
    print(f"peak RSS {rows[0]['fit_images']} -> {rows[-1]['fit_images']} images: {b / a:.2f}x (target <= 1.2x)")


S3_ENV = {  # dummy credentials of the local moto server only
    "AWS_ACCESS_KEY_ID": "bench-key",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def s3_rows(work: pathlib.Path, bench: BenchConfig) -> list[dict]:
    """Image GETs of a streamed one-worker run from S3, with and without the frame cache; on a fresh
    local Ray cluster that inherits the proxy's endpoint (call with Ray shut down)."""
    import ray
    from moto.server import ThreadedMotoServer

    from adcore import storage
    from tests.faults_proxy import FaultProxy

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the moto server's line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    rows = []
    try:
        with FaultProxy(f"http://{host}:{port}") as proxy:
            os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": proxy.endpoint})
            storage.s3_client().create_bucket(Bucket="bench-train")
            data = make_demo_dataset(work / "data-s3", n_train=bench.s3_images, n_valid=8, n_test=2, size=64)
            storage.upload_dir(data, "s3://bench-train/data")
            cfg = TrainConfig(preset=bench.preset, tiny=bench.tiny, epochs=bench.s3_epochs, batch_size=bench.batch_size)
            for cache in (True, False):
                job = train_job.JobConfig(
                    data="s3://bench-train/data",
                    output=str(work / f"model-s3-{cache}"),
                    storage=str(work / "ray-s3"),
                    max_failures=0,
                    frame_cache=cache,
                )
                before = proxy.gets("/data/train/")
                train_job.main(job, cfg)
                rows.append({"frame_cache": cache, "gets": proxy.gets("/data/train/") - before})
    finally:
        ray.shutdown()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return rows


def print_s3(rows: list[dict], bench: BenchConfig) -> None:
    print()
    print(f"S3 image GETs, one worker, {bench.s3_images} training images, {bench.s3_epochs} epochs (+ stage 1, fit):")
    for r in rows:
        ratio = r["gets"] / bench.s3_images
        kind = "frame cache" if r["frame_cache"] else "--no-frame-cache"
        target = " (target <= 1.05x)" if r["frame_cache"] else ""
        print(f"{kind:>16}: {r['gets']} GETs = {ratio:.2f}x the training images{target}")


def main(bench: BenchConfig) -> list[dict]:
    import ray
    from ray.cluster_utils import Cluster

    work = pathlib.Path(tempfile.mkdtemp(prefix="rbench", dir="/tmp"))
    if "RAY_TMPDIR" not in os.environ:  # short, for unix socket paths; removed at the end with `work`
        os.environ["RAY_TMPDIR"] = str(work / "ray")
    data = make_demo_dataset(work / "data", n_train=bench.n_train, n_valid=8, n_test=2, size=bench.image_size)
    rows = []
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            cluster.add_node(num_cpus=1)
            for workers in WORKER_COUNTS:
                rows.append(run_once(cluster.address, str(data), work, workers, bench))
            memory = memory_rows(cluster.address, work, bench) if bench.memory_images else []
        finally:
            ray.shutdown()
            cluster.shutdown()
        s3 = s3_rows(work, bench) if bench.s3_images else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    if memory:
        print_memory(memory, bench)
    if s3:
        print_s3(s3, bench)
    fit = fit_rows(bench) if bench.fit_images else []
    if fit:
        print_fit(fit, bench)
    return rows + memory + s3 + fit


if __name__ == "__main__":
    main(parse_config(BenchConfig, None, __doc__.split("\n")[0]))

"""Benchmark: the scoring pipeline's images/s against the bare network in a tight loop.

    python bench/score_pipeline.py [--artifact PATH] [--n 64] [--scale 10] [--batch-size 32] [--triton]

One run, same images and model: S3 (moto on 127.0.0.1) -> Ray Data -> network -> FAISS ->
Parquet, in-process and (with --triton) through a local Triton, vs ``scorer.forward`` +
head on pre-decoded batches at the same batch size and torch threads. Prints the ratios
(targets: >= 0.8 in-process, >= 0.7 through Triton) and peak RSS of the driver + its Ray
processes for N and scale*N images (target: within 10%). Without --artifact a tiny
random model is used (its forward is so cheap that fixed costs dominate the ratio).
"""

from __future__ import annotations

import pathlib
import sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E702  repo root

import argparse
import io
import os
import tempfile
import threading
import time

import numpy as np

SAMPLE_S = 0.2  # memory sampling period
IMAGE_SIDE = 256  # synthetic archive images (8-bit grayscale PNG)


class PeakRSS:
    """Peak summed RSS of this process and all its descendants (Ray's workers), sampled."""

    def __enter__(self):
        import psutil

        self.peak, self._stop = 0, threading.Event()
        me = psutil.Process()

        def loop():
            while not self._stop.is_set():
                total = 0
                for p in [me, *me.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                time.sleep(SAMPLE_S)

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def make_archive(prefix: str, n: int, seed: int = 0) -> None:
    from PIL import Image

    from adcore import storage

    rng = np.random.default_rng(seed)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random((IMAGE_SIDE, IMAGE_SIDE)) * 255).astype(np.uint8)).save(buf, format="PNG")
        storage.write_bytes(f"{prefix}/img{i:06d}.png", buf.getvalue())


def bare(artifact: str, n: int, batch: int, threads: int) -> float:
    """images/s of network + head on prepared batches (no decode, no Ray)."""
    import torch

    from adcore.scorer import load

    torch.set_num_threads(threads)
    scorer = load(artifact)
    s = scorer.input_size
    pixels = np.random.default_rng(0).random((batch, 3, s, s), dtype=np.float32)
    scorer.head(scorer.forward(pixels))  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n:
        scorer.head(scorer.forward(pixels))
        done += batch
    return done / (time.perf_counter() - t0)


def pipeline(cfg_kw: dict) -> tuple[float, float, float]:
    """(images/s over the streaming part, images/s over the whole job, peak RSS bytes)."""
    from jobs.score import ScoreConfig, main

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        m = main(ScoreConfig(**cfg_kw))
        wall = time.perf_counter() - t0
    assert m["counts"]["error"] == 0, m
    return m["rows"] / m["seconds"], m["rows"] / wall, mem.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default="")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--triton", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-bench")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"})
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket="bench")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="adcore-bench-"))
    artifact = args.artifact
    if not artifact:
        from tests.tiny import tiny_artifact

        artifact = tiny_artifact(str(tmp / "model"))
    from jobs.common import init_ray
    from jobs.score import plan_resources

    init_ray(num_cpus=os.cpu_count())
    import ray

    total = ray.cluster_resources()["CPU"]
    actor_cpus, _ = plan_resources(total, total)
    threads = max(1, int(actor_cpus))
    sizes = [args.n, args.n * args.scale]
    for n in sizes:
        make_archive(f"s3://bench/in{n}", n)
    ref = bare(artifact, max(sizes), args.batch_size, threads)
    print(f"bare network+head: {ref:.1f} images/s (batch {args.batch_size}, {threads} thread(s))")
    common = dict(model=artifact, batch_size=args.batch_size, progress_every_s=1e9)
    results = {}
    modes = [("in-process", {})]
    triton = None
    if args.triton:
        from adcore.export import export_onnx, write_triton_repository
        from adcore.scorer import load
        from adcore.serving import LocalTriton

        scorer = load(artifact)
        name = next(iter(write_triton_repository(scorer, export_onnx(scorer, tmp / "m.onnx"), tmp / "repo",
                                                  max_batch_size=args.batch_size, intra_op_num_threads=threads)))
        triton = LocalTriton(tmp / "repo", models=[name]).start()
        modes.append(("triton", dict(triton_url=triton.http_url, triton_model=name, triton_batch=args.batch_size)))
    try:
        for mode, extra in modes:
            for n in sizes:
                stream, whole, peak = pipeline(common | extra | dict(input=f"s3://bench/in{n}",
                                                                     output=f"s3://bench/out-{mode}-{n}"))
                results[(mode, n)] = (stream, whole, peak)
                print(f"{mode:10s} n={n:6d}: {stream:7.1f} images/s streaming ({stream / ref:.2f} of bare), "
                      f"{whole:7.1f} images/s whole job ({whole / ref:.2f}), peak RSS {peak / 2**30:.2f} GiB")
            a, b = results[(mode, sizes[0])][2], results[(mode, sizes[1])][2]
            print(f"{mode}: peak RSS {sizes[1]} vs {sizes[0]} images: {b / a:.2f}x")
    finally:
        if triton is not None:
            triton.stop()
        server.stop()


if __name__ == "__main__":
    main()

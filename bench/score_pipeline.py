"""Benchmark: the scoring pipeline's images/s against the bare network in a tight loop.

    python bench/score_pipeline.py [--model out/pc] [--images out/demo/test] [--n 64] [--scale 10]
        [--batch-size 32] [--threads 0] [--no-triton] [--no-tiny]

One run, same images and model, figures side by side: S3 (moto on 127.0.0.1) -> Ray Data ->
network -> FAISS -> Parquet, in-process (torch) and through a local Triton (onnxruntime in its
Python backend), each against the bare network + FAISS head of the same engine (torch, resp.
onnxruntime) on pre-decoded batches at the same batch size and threads. Targets: >= 0.8
in-process, >= 0.7 through Triton; peak RSS (driver + its Ray and Triton processes) for
scale*N images within 10% of N.

Timed windows: "steady" excludes model loading and the first batch on both sides (the bare
loop loads the model and runs one warm-up batch untimed; the job's figure counts the rows
written after its first output, over their time: the manifest's ``steady_rows_per_s``).
"whole job" is rows over the wall time of ``jobs.score.main`` (listing, Ray Data start,
model actor start, everything). The default model is the real PatchCore (DINOv2-S) artifact
``out/pc``; build it with ``python -m adcore.train --data out/demo --preset patchcore --output
out/pc`` (about 90 s). A tiny random-init model is also run (overhead-only: its forward is
almost free, so that line measures the pipeline's fixed costs, not a ratio to reach).
"""

from __future__ import annotations

import io
import os
import pathlib
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_S = 0.2  # memory sampling period
SYNTHETIC_SIDE = 224  # synthetic archive images when --images is missing (8-bit grayscale PNG)
MIN_STEADY_BATCHES = 8  # fewer batches than this: the job's outputs can arrive together, no steady figure
BARE_BATCHES = 4  # timed batches of the bare loop (after one warm-up batch), before and after the pipeline
TARGETS = {"in-process": 0.8, "triton": 0.7}  # pipeline / bare (the targets)
MEMORY_TARGET = 1.10  # peak RSS at scale*N over N


class PeakRSS:
    """Peak summed RSS of this process and all its descendants (Ray's and Triton's), sampled.

    RSS counts shared pages (the object store) once per process mapping them: an upper bound.
    """

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


def source_images(folder: str) -> list[bytes]:
    """PNG bytes of the demo images under ``folder`` (label masks excluded), or synthetic ones."""
    files = sorted(p for p in pathlib.Path(folder).rglob("*.png") if "label" not in p.parts) if folder else []
    if files:
        return [p.read_bytes() for p in files]
    from PIL import Image

    print(f"note: no PNG under {folder!r}: synthetic {SYNTHETIC_SIDE}px noise images instead")
    rng, out = np.random.default_rng(0), []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray((rng.random((SYNTHETIC_SIDE,) * 2) * 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_archive(prefix: str, n: int, images: list[bytes]) -> None:
    """``n`` files under ``prefix``, cycling through ``images`` (distinct names, so all are scored)."""
    from adcore import storage

    for i in range(n):
        storage.write_bytes(f"{prefix}/img{i:06d}.png", images[i % len(images)])


def decoded_batch(images: list[bytes], batch: int, size: int) -> np.ndarray:
    """The first ``batch`` archive images, decoded and prepared as the pipeline does."""
    from jobs.scoring.stages import Decoder

    dec = Decoder(size, 10**9)
    data = [images[i % len(images)] for i in range(batch)]
    out = dec({"bytes": np.array(data, dtype=object), "path": np.array([f"b{i}.png" for i in range(batch)])})
    return np.ascontiguousarray(out["pixels"])


def bare(artifact: str, pixels: np.ndarray, threads: int, onnx_path: str = "") -> float:
    """images/s of network + FAISS head on one prepared batch, repeated (no decode, no Ray).

    Model loading and one warm-up batch are not timed.
    """
    import faiss
    import torch

    from adcore.export import OnnxNetwork
    from adcore.scorer import load

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    scorer = load(artifact)
    if onnx_path:
        scorer.network = OnnxNetwork(onnx_path, threads=threads)
    scorer.raw(pixels)  # warm-up
    t0 = time.perf_counter()
    for _ in range(BARE_BATCHES):
        scorer.raw(pixels)
    return BARE_BATCHES * len(pixels) / (time.perf_counter() - t0)


def pipeline(cfg_kw: dict) -> dict:
    """One job run: steady (None with too few batches) and whole-job images/s, startup s, peak RSS bytes."""
    from jobs.score import ScoreConfig, main

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        m = main(ScoreConfig(**cfg_kw))
        wall = time.perf_counter() - t0
    assert m["counts"]["error"] == 0, m
    enough = m["rows"] >= MIN_STEADY_BATCHES * cfg_kw["batch_size"]
    return {
        "steady": m["steady_rows_per_s"] if enough else None,
        "whole": m["rows"] / wall,
        "startup": m["first_rows_seconds"],
        "peak": mem.peak,
    }


def run_modes(
    label: str,
    artifact: str,
    sizes: list[int],
    batch: int,
    threads: int,
    images: list[bytes],
    tmp: pathlib.Path,
    triton: bool,
) -> list[str]:
    """Bare + pipeline for each engine; returns the summary lines."""
    from adcore.export import export_onnx, write_triton_repository
    from adcore.scorer import load

    scorer = load(artifact)
    pixels = decoded_batch(images, batch, scorer.input_size)
    common = dict(model=artifact, batch_size=batch, inference_threads=threads, progress_every_s=1e9)
    modes = [("in-process", "torch", {}, "")]
    server = None
    if triton:
        from adcore.serving import LocalTriton

        onnx = str(export_onnx(scorer, tmp / "model.onnx"))
        name = next(
            iter(
                write_triton_repository(scorer, onnx, tmp / "repo", max_batch_size=batch, intra_op_num_threads=threads)
            )
        )
        server = LocalTriton(tmp / "repo", models=[name]).start()
        modes.append(
            ("triton", "onnxruntime", dict(triton_url=server.grpc_url, triton_model=name, triton_batch=batch), onnx)
        )
    tag = label.split(",")[0]  # S3-safe
    lines = []
    try:
        for mode, engine, extra, onnx_path in modes:
            before = bare(artifact, pixels, threads, onnx_path)
            print(f"[{label}] bare {engine} (before): {before:.2f} images/s", flush=True)
            runs = {}
            for n in sizes:
                runs[n] = pipeline(
                    common | extra | dict(input=f"s3://bench/in{n}", output=f"s3://bench/out-{tag}-{mode}-{n}")
                )
            after = bare(artifact, pixels, threads, onnx_path)
            ref = (before + after) / 2  # the machine is shared: the pipeline ran between the two
            line = (
                f"[{label}] bare {engine} network+head: {ref:.2f} images/s (before {before:.2f}, after "
                f"{after:.2f}; batch {batch}, {threads} threads)"
            )
            print(line, flush=True)
            lines.append(line)
            for n, r in runs.items():
                steady = (
                    f"steady {r['steady']:6.2f} images/s = {r['steady'] / ref:.2f} of bare"
                    if r["steady"]
                    else "steady n/a (too few batches)"
                )
                line = (
                    f"[{label}] {mode:10s} n={n:5d}: {steady} | whole job {r['whole']:6.2f} = {r['whole'] / ref:.2f} "
                    f"(startup {r['startup']:.1f} s) | peak RSS {r['peak'] / 2**30:.2f} GiB"
                )
                print(line, flush=True)
                lines.append(line)
            if len(sizes) > 1 and runs[sizes[-1]]["steady"]:
                growth = runs[sizes[-1]]["peak"] / runs[sizes[0]]["peak"]
                best = runs[sizes[-1]]["steady"] / ref
                line = (
                    f"[{label}] {mode}: ratio at n={sizes[-1]} {best:.2f} (target {TARGETS[mode]}), "
                    f"peak RSS {sizes[-1]} vs {sizes[0]} images {growth:.2f}x (target <= {MEMORY_TARGET})"
                )
                print(line, flush=True)
                lines.append(line)
    finally:
        if server is not None:
            server.stop()
    return lines


@dataclass
class PipelineBenchConfig:
    model: str = str(REPO / "out/pc")  # artifact to benchmark (real model)
    images: str = str(REPO / "out/demo/test")  # folder of PNGs cycled into the archive
    n: int = 64  # images of the small archive
    scale: int = 10  # the large archive holds n * scale images
    batch_size: int = 32
    threads: int = 0  # network threads; 0 = every CPU (the job's default)
    triton: bool = True  # also through the local Triton server
    tiny: bool = True  # also the overhead-only run with a tiny model


def main() -> None:
    from adcore.cli import parse_config

    args = parse_config(PipelineBenchConfig, None, __doc__.split("\n")[0])
    if not (pathlib.Path(args.model) / "config.json").is_file():
        raise SystemExit(
            f"--model {args.model}: no artifact there; build one with `python -m adcore.train "
            f"--data out/demo --preset patchcore --output out/pc` (about 90 s)"
        )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-bench")
    # Ray starts its workers at nice 15; the bare loop runs here at nice 0. On a shared machine that alone
    # hands the bare loop the CPU the pipeline's model actor would get: same priority for both.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
        }
    )
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(
        Bucket="bench"
    )
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="adcore-bench-"))
    from jobs.common import init_ray

    init_ray(num_cpus=os.cpu_count())
    threads = args.threads or os.cpu_count()
    images = source_images(args.images)
    sizes = [args.n, args.n * args.scale]
    for n in sizes:
        make_archive(f"s3://bench/in{n}", n, images)
    lines = []
    try:
        lines += run_modes("real", args.model, sizes, args.batch_size, threads, images, tmp, args.triton)
        if args.tiny:
            from adcore.testing import tiny_artifact

            tiny = tiny_artifact(str(tmp / "tiny"))
            lines += run_modes("tiny, overhead-only", tiny, sizes[-1:], args.batch_size, threads, images, tmp, False)
    finally:
        server.stop()
    print("\n== summary (" + " ".join(sys.argv[1:]) + f"; {len(images)} source images) ==")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

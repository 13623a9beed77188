"""Benchmark: the scoring pipeline's images/s against the fastest bare engine on this machine.

    python bench/score_pipeline.py [--model out/pc] [--images out/demo/test] [--n 64] [--scale 10]
        [--batch-size 32] [--threads 0] [--engine onnx] [--data out/demo] [--no-triton] [--no-tiny]

One run, same images and model, figures side by side. First every bare engine: network +
FAISS head in a tight loop on pre-decoded uint8 batches, with torch and with onnxruntime on
each precision variant of the artifact's cached graph (fp32, int8, fp16; fp32 also on one
thread), before and after the pipeline runs. Then the pipeline, S3 (moto on 127.0.0.1) ->
Ray Data -> decode -> network -> FAISS -> Parquet, in-process (``--engine``) and through a
local Triton (onnxruntime in its Python backend, gRPC, 4 requests in flight per replica),
each divided by the *fastest* bare fp32 engine (and by its own engine's). Triton's statistics
endpoint gives the average batch its dynamic batcher formed. fp32 / int8 / fp16 speed and
validation AUROC (``--data``: recorded in the artifact's engine cache) are printed side by
side. Targets: >= 0.8 in-process, >= 0.7 through Triton; peak RSS (driver + its Ray and
Triton processes) for scale*N images within 10% of N; int8 >= 1.5x fp32 within 0.005 AUROC.

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
VARIANTS = ("fp32", "int8", "fp16")  # adcore.export.VARIANTS (not imported at module level: argparse first)
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


def bare(artifact: str, pixels: np.ndarray, threads: int, engine: str = "torch", variant: str = "fp32") -> float:
    """images/s of network + FAISS head on one prepared batch, repeated (no decode, no Ray).

    ``engine`` torch or onnx (the graph of ``variant`` from the artifact's engine cache, exported
    there once). Model loading and one warm-up batch are not timed.
    """
    import faiss
    import torch

    from adcore import engine as engines
    from adcore.scorer import load

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    scorer = load(artifact, use_gpu=False)
    scorer.network = engines.load_network(scorer, engine, variant, threads, device="cpu", require_usable=False)
    scorer.raw(pixels)  # warm-up
    t0 = time.perf_counter()
    for _ in range(BARE_BATCHES):
        scorer.raw(pixels)
    return BARE_BATCHES * len(pixels) / (time.perf_counter() - t0)


def bare_engines(artifact: str, pixels: np.ndarray, threads: int) -> dict[str, float]:
    """Every bare engine on this machine: torch, onnxruntime fp32 (also with 1 thread), int8, fp16."""
    rates = {"torch": bare(artifact, pixels, threads, "torch")}
    for variant in VARIANTS:
        rates[f"onnx {variant}"] = bare(artifact, pixels, threads, "onnx", variant)
    if threads > 1:
        rates["onnx fp32, 1 thread"] = bare(artifact, pixels, 1, "onnx")
    return rates


def variant_table(artifact: str, data: str, rates: dict[str, float], limit: int | None) -> list[str]:
    """fp32 / int8 / fp16 side by side: bare speed (and x fp32) and validation AUROC (recorded in the artifact)."""
    from adcore.evaluate import measure_variants
    from adcore.scorer import load

    record = None
    if data and (pathlib.Path(data) / "valid").is_dir():
        record = measure_variants(load(artifact, use_gpu=False), data, VARIANTS, limit=limit)
    lines = [f"{'variant':8s} {'bare img/s':>11s} {'x fp32':>7s} {'image AUROC':>12s} {'pixel AUROC':>12s}  usable"]
    for variant in VARIANTS:
        rate = rates[f"onnx {variant}"]
        row = (record or {}).get("variants", {}).get(variant, {})
        image, pixel = ("-" if row.get(k) is None else f"{row[k]:.4f}" for k in ("image_auroc", "pixel_auroc"))
        usable = "-" if not row else ("yes" if row["usable"] else "NO")
        lines.append(f"{variant:8s} {rate:11.2f} {rate / rates['onnx fp32']:7.2f} {image:>12s} {pixel:>12s}  {usable}")
    if record:
        n, tol = record["n_images"], record["tolerance"]
        lines.append(f"(AUROC on the validation split, {n} images; usable: both within {tol} of fp32)")
    return lines


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
    engine: str = "onnx",
    data: str = "",
    limit: int | None = None,
) -> list[str]:
    """Every bare engine, then the pipeline (in-process ``engine``, and through Triton) against the fastest.

    Returns the summary lines.
    """
    from adcore import engine as engines
    from adcore.scorer import load
    from adcore.serving.artifacts import write_triton_repository

    scorer = load(artifact, use_gpu=False)
    pixels = decoded_batch(images, batch, scorer.input_size)
    common = dict(model=artifact, batch_size=batch, inference_threads=threads, progress_every_s=1e9)
    modes = [("in-process", "torch" if engine == "torch" else "onnx fp32", dict(engine=engine))]
    server = name = None
    if triton:
        from adcore.serving import LocalTriton

        onnx = engines.ensure_onnx(scorer)  # the artifact's cached graph (uint8 in)
        dirs = write_triton_repository(scorer, onnx, tmp / "repo", max_batch_size=batch, intra_op_num_threads=threads)
        name = next(iter(dirs))
        server = LocalTriton(tmp / "repo", models=[name]).start()
        # Requests of half a batch, 4 in flight (the job's default): the dynamic batcher has requests to merge.
        triton_kw = dict(triton_url=server.grpc_url, triton_model=name, triton_batch=max(1, batch // 2))
        modes.append(("triton", "onnx fp32", triton_kw))
    tag = label.split(",")[0]  # S3-safe
    lines = []
    try:
        before = bare_engines(artifact, pixels, threads)
        print(f"[{label}] bare (before): " + ", ".join(f"{k} {v:.2f}" for k, v in before.items()), flush=True)
        runs: dict[str, dict] = {}
        batches: dict[str, float] = {}
        for mode, _, extra in modes:
            stats = _triton_stats(server, name) if mode == "triton" else None
            for n in sizes:
                runs[(mode, n)] = pipeline(
                    common | extra | dict(input=f"s3://bench/in{n}", output=f"s3://bench/out-{tag}-{mode}-{n}")
                )
            if stats is not None:
                after_stats = _triton_stats(server, name)
                executions = after_stats["execution_count"] - stats["execution_count"]
                rows = after_stats["inference_count"] - stats["inference_count"]
                batches[mode] = rows / executions if executions else float("nan")
        after = bare_engines(artifact, pixels, threads)
        ref = {k: (before[k] + after[k]) / 2 for k in before}  # the machine is shared: the pipeline ran between
        fastest = max(("torch", "onnx fp32"), key=ref.get)  # fp32 engines: what the pipeline could run at
        lines.append(
            f"[{label}] bare network+head, images/s (batch {batch}, {threads} threads; mean of before/after): "
            + ", ".join(f"{k} {v:.2f}" for k, v in ref.items())
            + f"; fastest fp32 engine: {fastest}"
        )
        lines += [f"[{label}] {line}" for line in variant_table(artifact, data, ref, limit)]
        for mode, engine_label, _ in modes:
            for n in sizes:
                r = runs[(mode, n)]
                steady = (
                    f"steady {r['steady']:6.2f} images/s = {r['steady'] / ref[fastest]:.2f} of fastest bare "
                    f"({r['steady'] / ref[engine_label]:.2f} of bare {engine_label})"
                    if r["steady"]
                    else "steady n/a (too few batches)"
                )
                lines.append(
                    f"[{label}] {mode:10s} n={n:5d}: {steady} | whole job {r['whole']:6.2f} = "
                    f"{r['whole'] / ref[fastest]:.2f} (startup {r['startup']:.1f} s) | "
                    f"peak RSS {r['peak'] / 2**30:.2f} GiB"
                )
            if mode in batches:
                lines.append(f"[{label}] {mode}: average batch the dynamic batcher formed {batches[mode]:.2f}")
            if len(sizes) > 1 and runs[(mode, sizes[-1])]["steady"]:
                growth = runs[(mode, sizes[-1])]["peak"] / runs[(mode, sizes[0])]["peak"]
                best = runs[(mode, sizes[-1])]["steady"] / ref[fastest]
                lines.append(
                    f"[{label}] {mode}: steady at n={sizes[-1]} {best:.2f} of the fastest bare engine (target "
                    f"{TARGETS[mode]}), peak RSS {sizes[-1]} vs {sizes[0]} images {growth:.2f}x "
                    f"(target <= {MEMORY_TARGET})"
                )
        for line in lines:
            print(line, flush=True)
    finally:
        if server is not None:
            server.stop()
    return lines


def _triton_stats(server, name: str) -> dict[str, int]:
    """The server's counters for ``name`` (images inferred, executions = batches formed)."""
    from adcore.serving import TritonClient

    with TritonClient(server.grpc_url, name, protocol="grpc") as client:
        return client.statistics()


@dataclass
class PipelineBenchConfig:
    model: str = str(REPO / "out/pc")  # artifact to benchmark (real model)
    images: str = str(REPO / "out/demo/test")  # folder of PNGs cycled into the archive
    n: int = 64  # images of the small archive
    scale: int = 10  # the large archive holds n * scale images
    batch_size: int = 32
    threads: int = 0  # network threads; 0 = every CPU (the job's default)
    engine: str = "onnx"  # the in-process pipeline's engine (jobs/score.py --engine)
    data: str = str(REPO / "out/demo")  # BMAD folder: fp32/int8/fp16 AUROC on its validation split ("" skips)
    limit: int | None = None  # validation images for the AUROC (None: all)
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
        real = (args.model, sizes, args.batch_size, threads, images, tmp, args.triton, args.engine)
        lines += run_modes("real", *real, args.data, args.limit)
        if args.tiny:
            from adcore.testing import tiny_artifact

            tiny = tiny_artifact(str(tmp / "tiny"))
            lines += run_modes(
                "tiny, overhead-only", tiny, sizes[-1:], args.batch_size, threads, images, tmp, False, args.engine
            )
    finally:
        server.stop()
    print("\n== summary (" + " ".join(sys.argv[1:]) + f"; {len(images)} source images) ==")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

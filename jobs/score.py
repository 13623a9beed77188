"""Nightly archive scoring: Ray Data from local/S3 through the model and FAISS to Parquet.

    python jobs/score.py --input s3://archive/images --model s3://models/brain/v3 \
        --output s3://results/scores [--triton-url 10.0.0.5:8001 --triton-protocol grpc] \
        [--rescore-all] [--batch-size 64] [--smoke-test]

Stages: read files (with paths) -> decode + prepare (CPU tasks; a bad file becomes an
error row) -> network (in-process torch / onnxruntime, or Triton) + FAISS head +
postprocess (one actor) -> Parquet, written by the driver into this run's own folder,
then the run's manifest (see ``jobs/scoring/ledger.py`` for the exactly-once rules and
``jobs/scoring/schema.py`` for the output schema). Ray Data's ``write_parquet`` (which
appends by default) is not used: the driver writes the streamed result itself, so the
manifest's counts are exactly the rows in the files, and progress is logged as it goes.

Inputs: every file under ``--input`` except hidden ones (name starting with "."); the
format comes from the content (PNG, JPEG, TIFF, DICOM, NIfTI; volumes one row per
slice). A file whose header announces more than ``--max-pixels`` pixels is an error row
of kind ``too_large`` (refused before decoding; it is not downscaled). S3 endpoint and
credentials come from the standard AWS_* environment variables. DICOM studies get a
pseudonymous ``study_key`` keyed by ``ADCORE_STUDY_KEY_SECRET``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import pathlib
import posixpath
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace

from adcore import storage
from adcore.cli import parse_config
from jobs.scoring import ledger
from jobs.scoring import schema as S
from jobs.scoring.stages import Decoder, ScoreStage

log = logging.getLogger("jobs.score")

SECRET_ENV = "ADCORE_STUDY_KEY_SECRET"
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000x7000; a chest film is 3-9 Mpx, larger is a mistake or a bomb
DECODE_BATCH = 8  # files per decode call: one NIfTI volume alone can be hundreds of frames
SMOKE_IMAGES = 8
# Memory the model actor reserves: its artifact about twice (weights, FAISS arrays, copies made
# while loading) + a base for torch's runtime + the batch's activations (a ViT-S PatchCore actor
# peaked at 0.8-1.2 GiB at batch 16-32). Declaring it also keeps Ray Data from fusing the decode
# tasks into the actor (different resources), where decoding would run serially with the model.
ACTOR_MEMORY_FACTOR = 2
ACTOR_MEMORY_BASE = 5 * 2**28  # 1.25 GiB
# Object store the streaming pipeline may fill, in model batches of prepared pixels: enough for
# decoding to stay ahead of the model, small enough that memory does not grow with the archive
# (unbounded, decoding runs far ahead of a real model and fills the store with pixels).
IN_FLIGHT_BATCHES = 8
MIN_IN_FLIGHT_BYTES = 256 * 2**20  # Ray Data needs room for a few read/decode blocks whatever the batch
MIN_BLOCK_BYTES = 2**20  # Ray Data's own minimum target block size: tiny inputs stay in few blocks


@dataclass
class ScoreConfig:
    input: str = ""  # local folder or s3:// prefix, read recursively
    model: str = ""  # artifact (local folder or s3:// prefix)
    output: str = ""  # local folder or s3:// prefix of the Parquet dataset
    triton_url: str = ""  # host:port; empty = run the network in-process
    triton_protocol: str = "http"
    triton_model: str = ""  # model name in Triton; default: the artifact's model_name
    triton_timeout_s: float = 30.0
    triton_retries: int = 3  # then the batch's rows become error rows (kind "inference")
    triton_backoff_s: float = 0.5  # first wait between retries, doubled each time
    triton_batch: int = 16  # largest request; must not exceed the Triton model's max_batch_size
    engine: str = "torch"  # in-process network: "torch" or "onnx" (onnxruntime)
    rescore_all: bool = False  # score everything again; the new rows supersede older ones
    batch_size: int = 64  # frames per model+head call
    max_pixels: int = DEFAULT_MAX_PIXELS
    inference_cpus: float = 0.0  # CPUs of the model actor; 0 = all but one of the largest node's
    # torch/onnxruntime/FAISS threads of the model actor; 0 = every CPU of the largest node: decoding is
    # about 1% of a real network's CPU time and fills the gaps, the logical CPU left free keeps it scheduled
    inference_threads: int = 0
    files_per_block: int = 64  # read blocks: few and large, Ray's per-block cost dominates otherwise
    rows_per_file: int = 100_000  # Parquet rows per output file
    progress_every_s: float = 10.0
    ray_address: str = ""
    smoke_test: bool = False


# ----------------------------------------------------------------------------- per-run pieces
def list_inputs(uri: str) -> list[str]:
    """Every non-hidden file under ``uri`` (full URIs, sorted)."""
    files = storage.list_files(uri)
    return [f for f in files if not posixpath.basename(f).startswith(".")]


def read_artifact_config(uri: str) -> tuple[dict, int]:
    """The artifact's config and the bytes of its files (from its manifest), without loading weights."""
    try:
        config = json.loads(storage.read_bytes(storage.join(uri, "config.json")))
        manifest = json.loads(storage.read_bytes(storage.join(uri, "manifest.json")))
    except FileNotFoundError:
        raise SystemExit(f"--model {uri}: no complete artifact there (config.json/manifest.json missing)") from None
    return config, sum(int(e.get("size", 0)) for e in manifest.get("files", {}).values())


def plan_resources(total_cpus: float, node_cpus: float, inference_cpus: float = 0.0) -> tuple[float, float]:
    """(CPUs of the model actor, CPUs per decode task), always leaving CPU for reading.

    An actor pool holding every CPU starves the read stage and hangs without a message.
    """
    actor = inference_cpus or max(1.0, min(node_cpus, total_cpus) - 1.0)
    if total_cpus - actor < 1.0:  # one-CPU machines, or an oversized request: share
        actor = min(actor, max(0.5, total_cpus / 2))
    decode = 1.0 if total_cpus - actor >= 1.0 else max(0.25, total_cpus - actor)
    return actor, decode


def batch_bytes(batch_size: int, input_size: int) -> int:
    """Bytes of one model batch of prepared pixels ([B, 3, S, S] float32)."""
    return batch_size * 3 * input_size * input_size * 4


def check_triton_model(cfg: ScoreConfig, model_name: str, art: dict) -> None:
    """Refuse a Triton model that was not exported from this artifact (its network would be scored
    with another artifact's head and calibration, and labelled with the wrong model_version)."""
    from types import SimpleNamespace

    from adcore.export import ModelMismatchError, check_served_model

    if cfg.triton_protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    try:
        client = tc.InferenceServerClient(cfg.triton_url)
        config = (
            client.get_model_config(model_name, as_json=True)
            if cfg.triton_protocol == "grpc"
            else client.get_model_config(model_name)
        )
    except Exception as e:  # noqa: BLE001
        raise SystemExit(
            f"Triton at {cfg.triton_url} ({cfg.triton_protocol}) has no ready model {model_name!r}: "
            f"{type(e).__name__}: {str(e)[:200]}"
        ) from None
    try:
        check_served_model(config, SimpleNamespace(meta=art, version=art.get("model_version")))
    except ModelMismatchError as e:
        raise SystemExit(str(e)) from None


class RunWriter:
    """Writes a run's rows into its own folder, counts them, logs progress."""

    def __init__(
        self, output: str, run_dir: str, total_files: int, rows_per_file: int, progress_every_s: float, secret_set: bool
    ):
        import pyarrow.fs as pafs

        self.output, self.run_dir = output, run_dir
        self.fs, self.dir_path = storage.filesystem_for(run_dir)
        if not storage.is_s3(run_dir):
            self.fs.create_dir(self.dir_path, recursive=True)
        self._pafs = pafs
        self.total_files = total_files
        self.rows_per_file = rows_per_file
        self.progress_every_s = progress_every_s
        self.secret_set = secret_set
        self.files: list[str] = []
        self.writer = self.sink = None
        self.rows_in_file = 0
        self.status = Counter()
        self.errors = Counter()
        self.seen_files: set[str] = set()
        self.skipped_files = 0
        self.warned_secret = False
        self.first_rows_at: float | None = None  # monotonic time of the first written rows
        self.first_rows = 0
        self.t0 = self.last_log = time.monotonic()

    def write(self, table) -> None:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        self.seen_files.update(table.column("image_uri").to_pylist())
        skipped = pc.equal(table.column("status"), S.STATUS_SKIPPED)
        self.skipped_files += int(pc.sum(skipped).as_py() or 0)
        table = table.filter(pc.invert(skipped)).cast(S.SCHEMA)
        if table.num_rows:
            self.status.update(table.column("status").to_pylist())
            self.errors.update(S.error_kind(e) for e in table.column("error").to_pylist() if e)
            if not self.secret_set and not self.warned_secret and pc.any(pc.is_valid(table.column("modality"))).as_py():
                log.warning("%s is not set: study_key is null for DICOM inputs", SECRET_ENV)
                self.warned_secret = True
            if self.writer is None:
                name = f"part-{len(self.files):05d}.parquet"
                self.files.append(name)
                sink = self.fs.open_output_stream(posixpath.join(self.dir_path, name))
                self.sink = sink
                self.writer = pq.ParquetWriter(sink, S.SCHEMA, compression="zstd")
            self.writer.write_table(table)
            if self.first_rows_at is None:
                self.first_rows_at, self.first_rows = time.monotonic(), table.num_rows
            self.rows_in_file += table.num_rows
            if self.rows_in_file >= self.rows_per_file:
                self.close_file()
        now = time.monotonic()
        if now - self.last_log >= self.progress_every_s:
            self.last_log = now
            log.info(
                "progress: files %d/%d, rows %d (%.1f rows/s), errors %d",
                len(self.seen_files),
                self.total_files,
                self.rows,
                self.rows / max(now - self.t0, 1e-9),
                self.status[S.STATUS_ERROR],
            )

    @property
    def rows(self) -> int:
        return sum(self.status.values())

    def close_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()  # ParquetWriter leaves a caller's stream open; S3 commits the object here
            self.writer = self.sink = None
            self.rows_in_file = 0


def init_ray_for(cfg: ScoreConfig):
    import ray.data

    from jobs.common import init_ray

    init_ray(cfg.ray_address or None)
    return ray


# ----------------------------------------------------------------------------- main
def main(cfg: ScoreConfig) -> dict:
    """Run the job; returns the committed run's manifest."""
    if cfg.smoke_test:
        cfg = smoke_inputs(cfg)
    if not (cfg.input and cfg.model and cfg.output):
        raise SystemExit("--input, --model and --output are required (or --smoke-test)")
    # Ray workers run elsewhere than the driver's directory: pass absolute paths on.
    cfg = replace(cfg, **{k: storage.absolute(getattr(cfg, k)) for k in ("input", "model", "output")})
    art, art_bytes = read_artifact_config(cfg.model)
    model_name, model_version = art.get("model_name", "model"), art.get("model_version", "unsaved")
    input_size = int(art["input_size"])
    triton_model = cfg.triton_model or model_name
    if cfg.triton_url:
        check_triton_model(cfg, triton_model, art)

    started = dt.datetime.now(dt.timezone.utc)
    run_id = S.new_run_id(started)
    run_date = started.strftime("%Y-%m-%d")
    runs = ledger.completed_runs(cfg.output)
    ledger.cleanup_incomplete(cfg.output, {m["run_id"] for m in runs})
    scored = {} if cfg.rescore_all else ledger.scored_index(cfg.output, model_version)
    inputs = list_inputs(cfg.input)
    if not inputs:
        raise SystemExit(f"--input {cfg.input}: no files to score")
    secret = os.environ.get(SECRET_ENV, "").encode() or None
    log.info(
        "run %s: %d files from %s, model %s (%s), %d file(s) already scored, output %s",
        run_id,
        len(inputs),
        cfg.input,
        model_version,
        "triton " + cfg.triton_url if cfg.triton_url else cfg.engine,
        len(scored),
        cfg.output,
    )

    ray = init_ray_for(cfg)

    total = ray.cluster_resources().get("CPU", 1.0)
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=total)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    actor_cpus, decode_cpus = plan_resources(total, node_cpus, cfg.inference_cpus)
    threads = cfg.inference_threads or max(1, int(node_cpus))
    is_s3 = storage.is_s3(cfg.input)
    fs = storage.s3_filesystem() if is_s3 else None
    paths = [p[len(storage.S3_PREFIX) :] for p in inputs] if is_s3 else inputs
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job logs its own progress lines
    # Decoded blocks of about one model batch: the model starts after one batch is decoded (not a whole
    # read block), and each model call's rows come out (and are written) as soon as they are scored.
    ctx.target_max_block_size = max(MIN_BLOCK_BYTES, batch_bytes(cfg.batch_size, input_size))
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=max(MIN_IN_FLIGHT_BYTES, IN_FLIGHT_BATCHES * ctx.target_max_block_size)
    )

    ds = ray.data.read_binary_files(
        paths,
        include_paths=True,
        filesystem=fs,
        override_num_blocks=max(1, math.ceil(len(paths) / cfg.files_per_block)),
    )
    decoder = Decoder(input_size, cfg.max_pixels, scored, storage.S3_PREFIX if is_s3 else "", secret)
    ds = ds.map_batches(decoder, batch_size=DECODE_BATCH, num_cpus=decode_cpus, batch_format="numpy")
    stage_kwargs = dict(
        artifact=cfg.model,
        run_id=run_id,
        engine=cfg.engine,
        threads=threads,
        triton_url=cfg.triton_url,
        triton_model=triton_model,
        triton_protocol=cfg.triton_protocol,
        triton_timeout_s=cfg.triton_timeout_s,
        triton_retries=cfg.triton_retries,
        triton_backoff_s=cfg.triton_backoff_s,
        triton_batch=cfg.triton_batch,
    )
    ds = ds.map_batches(
        ScoreStage,
        fn_constructor_kwargs=stage_kwargs,
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=actor_cpus,
        num_gpus=1 if gpus and not cfg.triton_url else 0,
        memory=ACTOR_MEMORY_FACTOR * art_bytes + ACTOR_MEMORY_BASE,
        batch_format="numpy",
        zero_copy_batch=True,
    )

    rdir = ledger.run_dir(cfg.output, run_date, run_id)
    writer = RunWriter(cfg.output, rdir, len(inputs), cfg.rows_per_file, cfg.progress_every_s, bool(secret))
    t0 = time.monotonic()
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        writer.write(table)
    writer.close_file()
    elapsed = time.monotonic() - t0
    first = (writer.first_rows_at - t0) if writer.first_rows_at is not None else elapsed
    rel = posixpath.relpath(posixpath.join(writer.dir_path), storage.filesystem_for(cfg.output)[1])
    manifest = {
        "run_id": run_id,
        "run_date": run_date,
        "schema_version": S.SCHEMA_VERSION,
        "model_name": model_name,
        "model_version": model_version,
        "input": cfg.input,
        "output": cfg.output,
        "rescore_all": cfg.rescore_all,
        "engine": "triton" if cfg.triton_url else cfg.engine,
        "started_at": started.isoformat(timespec="seconds"),
        "completed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": [posixpath.join(rel, f) for f in writer.files],
        "input_files": len(inputs),
        "skipped_files": writer.skipped_files,
        "rows": writer.rows,
        "counts": {S.STATUS_OK: writer.status[S.STATUS_OK], S.STATUS_ERROR: writer.status[S.STATUS_ERROR]},
        "errors_by_kind": dict(writer.errors),
        "seconds": round(elapsed, 3),
        # Startup (model actor start + first batch) vs steady state: rows after the first output / their time.
        "first_rows_seconds": round(first, 3),
        "steady_rows_per_s": round((writer.rows - writer.first_rows) / max(elapsed - first, 1e-9), 3)
        if writer.rows > writer.first_rows
        else None,
    }
    uri = ledger.write_manifest(cfg.output, manifest)
    log.info(
        "done: %d rows (%d ok, %d errors %s), %d files skipped as already scored, %.1f rows/s; data %s, manifest %s",
        writer.rows,
        writer.status[S.STATUS_OK],
        writer.status[S.STATUS_ERROR],
        dict(writer.errors),
        writer.skipped_files,
        writer.rows / max(elapsed, 1e-9),
        rdir,
        uri,
    )
    return manifest


def smoke_inputs(cfg: ScoreConfig) -> ScoreConfig:
    """Fills in a few synthetic PNGs, a tiny artifact and a temporary output, when not given."""
    import numpy as np
    from PIL import Image

    root = pathlib.Path(tempfile.mkdtemp(prefix="adcore-score-smoke-"))
    if not cfg.input:
        rng = np.random.default_rng(0)
        (root / "in").mkdir()
        for i in range(SMOKE_IMAGES):
            Image.fromarray((rng.random((48, 64)) * 255).astype("uint8")).save(root / "in" / f"img{i}.png")
        (root / "in" / "broken.png").write_bytes(b"not a png")
    if not cfg.model:
        from adcore.testing import tiny_artifact  # test-size random-init model; smoke runs only

        tiny_artifact(str(root / "model"))
    return replace(
        cfg,
        input=cfg.input or str(root / "in"),
        model=cfg.model or str(root / "model"),
        output=cfg.output or str(root / "out"),
    )


def parse_args(argv: list[str] | None = None) -> ScoreConfig:
    return parse_config(ScoreConfig, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    main(parse_args())

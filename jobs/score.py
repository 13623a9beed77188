"""Nightly archive scoring: Ray Data from local/S3 through the model and FAISS to Parquet.

    python jobs/score.py --input s3://archive/images --model s3://models/brain/v3 \
        --output s3://results/scores [--triton-url 10.0.0.5:8001 --triton-protocol grpc] \
        [--replicas 2:16] [--device auto|gpu|cpu] [--rescore-all] [--batch-size 64] [--smoke-test] \
        [--dicom-output s3://pacs-outbox/adcore]

Stages: read files (with paths) -> decode + prepare (CPU tasks; a bad file becomes an
error row; frames travel as uint8) -> network (in-process torch / onnxruntime, or Triton)
+ FAISS head on the model replicas (an actor pool sized by ``jobs/scoring/resources.py``:
one per GPU, or per CPU node) -> calibration, upsampling and masks (CPU tasks) -> Parquet
written by Ray write tasks into this run's own folder (``jobs/scoring/sink.py``), then the
run's manifest from the tasks' counts (see ``jobs/scoring/ledger.py`` for the exactly-once
rules and ``jobs/scoring/schema.py`` for the output schema). No result row passes through
the driver; it logs progress from the write tasks' counts.

Inputs: every file under ``--input`` except hidden ones (name starting with "."); the
format comes from the content (PNG, JPEG, TIFF, DICOM, NIfTI; volumes one row per
slice). Bounds are decided before reading or decoding, each refused file one error row: a
file listed larger than ``--max-file-bytes`` (kind ``too_large``, never read); a local entry
that is not a regular file inside ``--input`` (a FIFO, socket, device, folder link or a link
leading outside: kind ``not_a_file``, never opened); a header announcing more than
``--max-pixels`` pixels (``too_large``; it is not downscaled) or more than ``--max-frames``
frames (``too_many_frames``). A read never goes past the listed size, and a decode task hands
its prepared frames on in chunks (``stages.DEFAULT_CHUNK_BYTES``). S3 endpoint and
credentials come from the standard AWS_* environment variables. DICOM studies get a
pseudonymous ``study_key`` keyed by ``ADCORE_STUDY_KEY_SECRET``.

An ``--input dicomweb+http(s)://host/dicom-web`` is a PACS: listed by QIDO-RS (filtered by
``--qido-study-date`` and ``--qido-modality``), each instance read by WADO-RS with the PACS
credentials of ``jobs/scoring/dicomweb.py``, skipped while its SOP Instance UID was scored with
this model version (``jobs/scoring/qido.py``). Its URIs hold DICOM UIDs: ``--path-privacy``
then defaults to pseudonymize.

Faults: S3 calls are retried with backoff (10 attempts), then the map or write task that met a
transient error (``TRANSIENT_ERRORS``) runs again; a file that still cannot be read, or vanished
since the listing, is an error row of kind ``read`` (scored again next night). A model call that
runs out of device memory is split in halves. Replicas start as nodes arrive (the job waits up to
``--wait-for-replicas-s`` for the first) and one that dies while loading is replaced. Results
reach the store block by block; a killed run's whole files are committed by the next run, which
scores only the rest. The commit is fenced by the output's lease (``jobs/scoring/lease.py``).

With ``--dicom-output`` DICOM inputs scored ok also get a DICOM Segmentation and a TID 1500
measurement report (``jobs/scoring/dicom_out.py``), written under ``<dicom-output>/<run_id>/``
only: they carry the source's patient and study modules, the Parquet never does.
``--pacs-url`` (DICOMweb STOW-RS) or ``--pacs-aet``/``--pacs-host``/``--pacs-port`` (DICOM
C-STORE) store each object in a PACS as it is written; what the PACS did not take waits under
``<dicom-output>/_pacs_pending/`` for the next run (``jobs/scoring/pacs.py``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pathlib
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, replace
from typing import Literal

import pyarrow as pa

from adcore import s3retry, storage
from adcore.cli import hidden, parse_config, required_unless, run_command
from adcore.data.decode import DEFAULT_MAX_FRAMES
from adcore.engine import EngineName
from adcore.errors import StorageURIError
from adcore.export import VariantName
from jobs.scoring import blocks, dicom_out, dicomweb, ledger, listing, pacs, qido
from jobs.scoring import lease as leases
from jobs.scoring import schema as S
from jobs.scoring.blocks import input_blocks
from jobs.scoring.lease import DEFAULT_TTL_S
from jobs.scoring.resources import cluster_nodes, node_types, plan_replicas
from jobs.scoring.schema import SECRET_ENV
from jobs.scoring.sink import ROWS_PER_WRITE, Progress, RunSink
from jobs.scoring.stages import Decoder, Postprocess, ScoreStage
from jobs.scoring.timings import Timings

log = logging.getLogger("jobs.score")

PROG = "python jobs/score.py"
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000x7000; a chest film is 3-9 Mpx, larger is a mistake or a bomb
DEFAULT_MAX_FILE_BYTES = 2 * 2**30  # whole multi-frame studies fit; a read holds the file in memory
DECODE_BATCH = 8  # files per decode call: one NIfTI volume alone can be hundreds of frames
SMOKE_IMAGES = 8
# Batches queued at each replica: one computing, one arriving; more lets one replica hoard the queue.
TASKS_IN_FLIGHT_PER_REPLICA = 2
# Calls a replica runs at once: one batch's input is gathered (and its output handed on) while the
# model runs on the other; the model calls themselves stay one at a time (one GPU's memory).
CALLS_IN_FLIGHT_PER_REPLICA = 2
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
ProgressMode = Literal["auto", "line", "log"]  # --progress
WRITE_CPU_SHARE = 0.5  # a write task is mostly waiting on the store
# Replicas that may die while loading (a node reclaimed, a crash in a CUDA library) in a row, each
# replaced, before the job fails: a replica that loads resets the count.
REPLICA_INIT_DEATHS = 3
# Errors of a map or write task that a later attempt can get past (throttling, a network blip),
# matched against the exception's message; Ray Data retries nothing unless told.
TRANSIENT_ERRORS = s3retry.TRANSIENT_ERRORS
# Attempts of a task after its first one (on top of each S3 call's own attempts with backoff).
MAP_RETRIES = 4


@dataclass
class ScoreConfig:
    input: str = required_unless("smoke_test", "")  # folder or s3:// prefix (recursive), or dicomweb+http(s)://PACS
    qido_study_date: str = ""  # DICOMweb --input: studies of this StudyDate or range (20240101-20241231, open ends ok)
    qido_modality: str = ""  # DICOMweb --input: series of this modality (CT, MR, ...) in studies that have it
    # s3:// URI of an S3 Inventory report's manifest.json describing --input's bucket: listed from it, no LIST
    inventory: str = ""
    list_tasks: int = listing.DEFAULT_TASKS  # Ray tasks listing an s3:// --input by prefix ranges; 1 = one LIST loop
    model: str = required_unless("smoke_test", "")  # artifact (local folder or s3:// prefix)
    output: str = required_unless("smoke_test", "")  # local folder or s3:// prefix of the Parquet dataset
    triton_url: str = ""  # host:port; empty = run the network in-process
    triton_protocol: Literal["grpc", "http"] = "grpc"  # grpc: several requests in flight per replica; http: one
    triton_model: str = ""  # model name in Triton; default: the artifact's model_name
    triton_timeout_s: float = 30.0
    triton_retries: int = 3  # then the batch's rows become error rows (kind "inference")
    triton_backoff_s: float = 0.5  # first wait between retries, doubled each time
    triton_batch: int = 16  # largest request; must not exceed the Triton model's max_batch_size
    # gRPC requests each replica keeps in flight: at least twice the server's model instances, so its
    # dynamic batcher has requests to merge
    triton_in_flight: int = 4
    engine: EngineName = "auto"  # in-process network: auto (onnxruntime on CPU, torch on CUDA), torch or onnx
    variant: VariantName = "fp32"  # ONNX precision; int8/fp16 refused unless jobs/export.py --data measured them usable
    autocast: bool = True  # torch on CUDA: the family's autocast dtype where it declares one; --no-autocast: fp32
    rescore_all: bool = False  # score everything again; the new rows supersede older ones
    batch_size: int = 64  # frames per model+head call
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger files by the listing's size: too_large, never read
    max_frames: int = DEFAULT_MAX_FRAMES  # frames per file (DICOM, TIFF pages, NIfTI slices); more: too_many_frames
    device: Literal["auto", "gpu", "cpu"] = "auto"  # model replicas; gpu is demanded (an autoscaler starts GPU nodes)
    replicas: str = ""  # MIN[:MAX] model replicas; default: one per GPU, or per CPU node
    cpus_per_replica: float = 0.0  # 0 = 1 per GPU replica (the rest decode), a CPU node's CPUs less one for decoding
    gpus_per_replica: float = 1.0  # with --device gpu/auto on a cluster with GPUs
    autoscaling: bool = False  # the cluster's autoscaler can start nodes: wait for replicas instead of refusing
    cluster_config: str = ""  # with --autoscaling: the cluster launcher YAML whose node types the plan may use
    # how long the job waits for a node that can hold its first replica (a cold autoscaled GPU node boots,
    # pulls its image and installs CUDA libraries) before failing
    wait_for_replicas_s: float = 1800.0
    # torch/onnxruntime/FAISS threads per replica; 0 = its CPUs (plus the decode CPU's idle share on CPU nodes)
    inference_threads: int = 0
    # input blocks are sized by the bytes of the files they list (blocks.py); this caps their files (0: none)
    files_per_block: int = 0
    block_bytes: int = blocks.DEFAULT_TARGET_BYTES  # listed bytes of the files one input block (decode task) reads
    rows_per_file: int = ROWS_PER_WRITE  # rows per write task and Parquet file (one row group); 0: one per block
    progress_every_s: float = 10.0
    # auto: one line redrawn in place on a terminal (stderr a TTY), periodic log lines otherwise; or "line", "log"
    progress: ProgressMode = "auto"
    # local folder or s3:// prefix: DICOM-SEG + SR per scored DICOM instance, under <dicom-output>/<run_id>/
    # (they carry the source's patient/study modules: PACS-bound, never mixed into --output)
    dicom_output: str = ""
    # credentials from the workers' environment: ADCORE_PACS_TOKEN or ADCORE_PACS_USER/ADCORE_PACS_PASSWORD
    pacs_url: str = ""  # DICOMweb root (http://pacs:8042/dicom-web): each SEG/SR stored by STOW-RS as written
    pacs_aet: str = ""  # or DICOM C-STORE of each SEG/SR as written (no DICOMweb): the PACS's AE title
    pacs_host: str = ""  # C-STORE: the PACS's host name or address (with --pacs-aet and --pacs-port)
    pacs_port: int = 0  # C-STORE: the PACS's DICOM port
    pacs_calling_aet: str = pacs.DEFAULT_CALLING_AET  # C-STORE: adcore's AE title, which the PACS must accept
    pacs_attempts: int = hidden(6)  # tries per object (tests: a PACS down for the whole run, quickly)
    retain_runs: int = 0  # newest run folders kept (older ones expire once no visible mask lives there); 0 = all
    # keep: tables carry image_uri; pseudonymize: they carry only image_key (HMAC of the URI with
    # ADCORE_STUDY_KEY_SECRET) and the key -> URI map goes to --path-map alone (paths often name patients);
    # auto: pseudonymize for a DICOMweb --input (its URIs hold Study/Series/SOP Instance UIDs), else keep
    path_privacy: Literal["auto", "keep", "pseudonymize"] = "auto"  # auto: pseudonymize for dicomweb+, else keep
    path_map: str = ""  # with --path-privacy pseudonymize: local folder or s3:// prefix of the key -> URI map
    wait_for_lease: float = 0.0  # seconds to wait while another run holds the output's lease; 0 = refuse at once
    lease_ttl_s: float = DEFAULT_TTL_S  # a run that stops renewing its lease (crashed) loses it after this long
    latest_buckets: int = ledger.DEFAULT_BUCKETS  # hash buckets of a new latest table (fixed once it exists)
    compact_memory: int = ledger.COMPACT_MEMORY  # bytes each compaction task reserves (DuckDB's limit within it)
    ray_address: str = ""
    smoke_test: bool = False
    # Benchmarks and tests: each model call also sleeps this long (a slow network, orchestration measured alone)
    simulated_batch_s: float = hidden(0.0)


# ----------------------------------------------------------------------------- per-run pieces
def list_inputs(uri: str, inventory: str = "", tasks: int = listing.DEFAULT_TASKS, start=None, filters=None):
    """Every non-hidden file under ``uri`` with its size and version, as Arrow (``jobs/scoring/listing.py``);
    ``start()`` starts Ray when the listing needs tasks; ``filters`` select a DICOMweb input's instances."""
    try:
        return listing.list_archive(uri, inventory, tasks, start, filters)
    except FileNotFoundError as e:
        raise SystemExit(f"--input {uri}: {e}") from None
    except StorageURIError as e:
        raise SystemExit(str(e)) from None


def read_artifact_config(uri: str) -> tuple[dict, int]:
    """The artifact's config and the bytes of its files (from its manifest), without loading weights."""
    try:
        config = json.loads(storage.read_bytes(storage.join(uri, "config.json")))
        manifest = json.loads(storage.read_bytes(storage.join(uri, "manifest.json")))
    except FileNotFoundError:
        raise SystemExit(f"--model {uri}: no complete artifact there (config.json/manifest.json missing)") from None
    return config, sum(int(e.get("size", 0)) for e in manifest.get("files", {}).values())


def batch_bytes(batch_size: int, input_size: int) -> int:
    """Bytes of one model batch of prepared pixels as the decoder ships them ([B, 3, S, S] uint8)."""
    return batch_size * 3 * input_size * input_size


def check_triton_model(cfg: ScoreConfig, model_name: str, art: dict) -> None:
    """Refuse a Triton model that was not exported from this artifact (its network would be scored
    with another artifact's head and calibration, and labelled with the wrong model_version)."""
    from types import SimpleNamespace

    from adcore.serving.artifacts import ModelMismatchError, check_served_model

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


class _ProgressLog:
    """Progress from the write tasks' counts while the run writes (a driver thread).

    On a terminal (``mode`` "line", or "auto" with stderr a TTY) one line for the whole run,
    redrawn in place every ``TTY_REDRAW_S``: files done of total, rows/s, errors, ETA. Otherwise
    (logs) a ``progress:`` log line every ``every_s`` seconds.
    """

    def __init__(self, progress, total_files: int, every_s: float, already: int = 0, mode: str = "auto", stream=None):
        import threading

        if mode not in PROGRESS_MODES:
            raise SystemExit(f"--progress {mode!r}: expected one of {', '.join(PROGRESS_MODES)}")
        self.stream = stream or sys.stderr
        self.line = mode == "line" or (mode == "auto" and _isatty(self.stream))
        self.progress, self.total = progress, total_files
        self.every_s = min(max(every_s, 0.5), TTY_REDRAW_S) if self.line else max(every_s, 0.5)
        self.already = already  # files skipped from the listing alone
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self.t0 = time.monotonic()

    def _run(self) -> None:
        import ray

        while not self.stop.wait(self.every_s):
            rows, errors, files = ray.get(self.progress.totals.remote())
            elapsed = max(time.monotonic() - self.t0, 1e-9)
            done = min(files + self.already, self.total)
            if self.line:
                self.stream.write("\r" + progress_line(done, self.total, rows, errors, elapsed, files) + "\033[K")
                self.stream.flush()
                continue
            log.info(
                "progress: files %d/%d, rows %d (%.1f rows/s), errors %d, ETA %s",
                done,
                self.total,
                rows,
                rows / elapsed,
                errors,
                _eta(self.total - done, files, elapsed),
            )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        if self.line:  # leave the terminal at the start of an empty line for the closing log lines
            self.stream.write("\r\033[K")
            self.stream.flush()


PROGRESS_MODES = typing.get_args(ProgressMode)
TTY_REDRAW_S = 1.0  # a terminal's progress line is redrawn at least this often


def progress_line(done: int, total: int, rows: int, errors: int, elapsed: float, files_this_run: int) -> str:
    """The terminal's progress line: ``files 12/100 (12%), rows 30 (4.1 rows/s), errors 1, ETA 0:01:20``."""
    pct = 100.0 * done / total if total else 100.0
    return (
        f"scoring: files {done}/{total} ({pct:.0f}%), rows {rows} ({rows / max(elapsed, 1e-9):.1f} rows/s), "
        f"errors {errors}, ETA {_eta(total - done, files_this_run, elapsed)}"
    )


def _eta(remaining: int, files_this_run: int, elapsed: float) -> str:
    """Remaining files at this run's file rate so far, as H:MM:SS (``--`` before the first file)."""
    if remaining <= 0:
        return "0:00:00"
    if files_this_run <= 0:
        return "--"
    return str(dt.timedelta(seconds=round(remaining * elapsed / files_this_run)))


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


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
    local = ("model", "output") if dicomweb.is_dicomweb(cfg.input) else ("input", "model", "output")
    cfg = replace(cfg, **{k: storage.absolute(getattr(cfg, k)) for k in local})
    cfg = _check_dicomweb_input(cfg)
    if cfg.progress not in PROGRESS_MODES:
        raise SystemExit(f"--progress {cfg.progress!r}: expected one of {', '.join(PROGRESS_MODES)}")
    if cfg.dicom_output:
        cfg = replace(cfg, dicom_output=storage.absolute(cfg.dicom_output))
    if _pacs_sender(cfg) and not cfg.dicom_output:  # checks the PACS flags
        flag = "--pacs-url" if cfg.pacs_url else "--pacs-aet/--pacs-host/--pacs-port"
        raise SystemExit(f"{flag} needs --dicom-output (the objects are kept there, and resent from there)")
    if cfg.path_map:
        cfg = replace(cfg, path_map=storage.absolute(cfg.path_map))
    _check_privacy_flags(cfg)
    _check_apart(cfg)
    art, art_bytes = read_artifact_config(cfg.model)
    triton_model = cfg.triton_model or art.get("model_name", "model")
    if cfg.triton_url:
        check_triton_model(cfg, triton_model, art)

    try:
        lease = leases.acquire(cfg.output, S.new_run_id(), cfg.lease_ttl_s, cfg.wait_for_lease, _interrupt_main)
    except leases.LeaseHeld as e:
        raise SystemExit(str(e)) from None
    with lease:
        try:
            ledger.reject_late_commits(cfg.output)  # manifests written after their run lost the lease
            # Holding the lease, every other run has ended: a folder without a manifest is a dead run's.
            # Its whole files are committed (scored once, kept); what is left of it is removed below.
            ledger.salvage_incomplete(cfg.output, ledger.completed_ids(cfg.output), lease.number)
            # The run id is taken under the lease, so it sorts after every run committed before it
            # (even one that ended this very second, or whose host's clock ran ahead).
            started, run_id = next_run_id(cfg.output)
            lease.rename(run_id)
            manifest = _run_under_lease(cfg, lease, run_id, started, art, art_bytes, triton_model)
        except (KeyboardInterrupt, leases.LeaseLost):
            if lease.lost or sys.exc_info()[0] is leases.LeaseLost:
                why = lease.lost or str(sys.exc_info()[1])
                raise SystemExit(f"{why}; this run committed nothing (the next run keeps its whole files)") from None
            raise
    return manifest


def _pacs_sender(cfg: ScoreConfig) -> pacs.StowSender | pacs.CStoreSender | None:
    """The sender for the PACS flags (None: no PACS); refused with one line when they conflict."""
    return pacs.make_sender(
        cfg.pacs_url, cfg.pacs_aet, cfg.pacs_host, cfg.pacs_port, cfg.pacs_calling_aet, cfg.pacs_attempts
    )


def _interrupt_main(message: str) -> None:
    """The lease's watchdog lost the lease: stop the driver (its main thread) before the lease expires."""
    import _thread

    _thread.interrupt_main()


def next_run_id(output: str) -> tuple[dt.datetime, str]:
    """(start time, run id) for a new run: after the latest completed run's id."""
    started = dt.datetime.now(dt.timezone.utc)
    run_id = S.new_run_id(started)
    last = max(ledger.completed_ids(output), default="")
    if run_id <= last:
        started = dt.datetime.strptime(last[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
        started += dt.timedelta(seconds=1)
        run_id = S.new_run_id(started)
    return started, run_id


def _run_under_lease(cfg, lease, run_id, started, art, art_bytes, triton_model) -> dict:
    model_name, model_version = art.get("model_name", "model"), art.get("model_version", "unsaved")
    input_size = int(art["input_size"])
    run_date = started.strftime("%Y-%m-%d")
    ledger.cleanup_incomplete(cfg.output, ledger.completed_ids(cfg.output), keep=run_id)
    if cfg.dicom_output:
        dicom_out.cleanup_incomplete(cfg.dicom_output, cfg.output, ledger.completed_ids(cfg.output), keep=run_id)
        dicom_out.write_run_marker(cfg.dicom_output, run_id, cfg.output)
    sender = _pacs_sender(cfg)
    earlier = pacs.retry_pending(cfg.dicom_output, sender) if sender else None
    ledger.cleanup_latest(cfg.output)
    timings = Timings()
    if ledger.has_pending(cfg.output):  # a run that died between commit and compaction: its compaction on Ray
        with timings.phase("ray_init_s"):
            init_ray_for(cfg)
        with timings.phase("recover_s"):
            ledger.compact(cfg.output, cfg.latest_buckets, lease.check, memory=cfg.compact_memory)
    with timings.phase("list_s"):  # listing tasks start Ray if the input needs more than one LIST
        filters = qido.Filters(cfg.qido_study_date, cfg.qido_modality)
        listing = list_inputs(cfg.input, cfg.inventory, cfg.list_tasks, lambda: init_ray_for(cfg), filters)
    if not listing.num_rows:
        raise SystemExit(f"--input {cfg.input}: no files to score")
    with timings.phase("plan_s"):
        if cfg.path_privacy != "keep":  # kept paths are their own keys (ledger.plan_inputs): no copy of the listing
            key_secret = os.environ.get(SECRET_ENV, "").encode()
            keys = S.image_keys(listing.column("uri").to_pylist(), cfg.path_privacy, key_secret)
            listing = listing.append_column("image_key", pa.array(keys, pa.string()))
        todo, skipped = ledger.plan_inputs(cfg.output, listing, model_version, cfg.rescore_all)
    try:
        secret = S.study_key_secret()  # checked here; each decode task reads its own
    except ValueError as e:
        raise SystemExit(str(e)) from None
    log.info(
        "run %s: %d files listed under %s, %d unchanged since scored with model %s (skipped unread), %d to read; "
        "network %s, output %s",
        run_id,
        listing.num_rows,
        cfg.input,
        skipped,
        model_version,
        todo.num_rows,
        "triton " + cfg.triton_url if cfg.triton_url else cfg.engine,
        cfg.output,
    )
    fields = {
        "run_id": run_id,
        "run_date": run_date,
        "schema_version": S.SCHEMA_VERSION,
        "model_name": model_name,
        "model_version": model_version,
        "input": cfg.input,
        "output": cfg.output,
        "rescore_all": cfg.rescore_all,
        "path_privacy": cfg.path_privacy,
        "engine": "triton" if cfg.triton_url else cfg.engine,
        "started_at": started.isoformat(timespec="seconds"),
        "input_files": listing.num_rows,
        "unchanged_files": skipped,
    }
    if cfg.dicom_output:  # the run's DICOM folder; the manifest then lists every object in it
        fields["dicom_output"] = dicom_out.run_root(cfg.dicom_output, run_id)
    if sender:
        fields.update(pacs.describe(sender))
    if todo.num_rows:
        with timings.phase("score_s"):
            manifest, files_seen = _score(
                cfg, todo, fields, run_date, run_id, input_size, art, art_bytes, triton_model, secret
            )
    else:  # nothing changed: no Ray pipeline, no GET
        manifest, files_seen = RunSink.empty_manifest(fields, time.time() - started.timestamp()), 0
    manifest["skipped_files"] += skipped
    if sender:  # listed before the commit: a run that then dies leaves a list whose folder goes (ignored)
        manifest["pacs"]["earlier_runs"] = earlier
        pacs.record_pending(cfg.dicom_output, run_id, manifest["pacs"]["unsent_lists"])
    manifest["timings"] = timings.seconds  # fixed costs beside scoring; compaction's are in _latest/_manifest.json
    # The fenced commit: the manifest carries the lease's number and counts only if the store wrote it
    # before any newer lease existed (a run that lost its lease must not commit: the new holder may be
    # scoring the same files, and has removed this run's folder as a dead run's).
    manifest["lease"] = lease.number
    lease.check()
    lease.confirm(ledger.write_manifest(cfg.output, manifest))
    if cfg.dicom_output:  # before any expiry: a completed run's PACS objects are never removed
        dicom_out.write_run_marker(cfg.dicom_output, run_id, cfg.output, completed=True)
    ledger.compact(cfg.output, cfg.latest_buckets, lease.check, memory=cfg.compact_memory)
    lease.check()
    expired = ledger.expire_runs(cfg.output, cfg.retain_runs)
    files_done = manifest["skipped_files"] + files_seen
    log.info(
        "progress: files %d/%d, rows %d (%.1f rows/s), errors %d",
        min(files_done, listing.num_rows),
        listing.num_rows,
        manifest["rows"],
        manifest["rows_per_s"],
        manifest["counts"][S.STATUS_ERROR],
    )
    if manifest.get("oom_splits"):
        log.warning(
            "%d model call(s) ran out of device memory and were split (later calls at the size that fitted): "
            "lower --batch-size to avoid it",
            manifest["oom_splits"],
        )
    if manifest.get("pacs", {}).get("failed"):
        log.warning("%d DICOM object(s) not stored in the PACS: the next run sends them", manifest["pacs"]["failed"])
    if not secret and manifest.get("dicom_rows"):
        log.warning("%s is not set: study_key is null for DICOM inputs", SECRET_ENV)
    log.info(
        "done: %d rows (%d ok, %d errors %s), %d files skipped as already scored, %.1f rows/s on %d node(s); "
        "manifest %s%s",
        manifest["rows"],
        manifest["counts"][S.STATUS_OK],
        manifest["counts"][S.STATUS_ERROR],
        manifest["errors_by_kind"],
        manifest["skipped_files"],
        manifest["rows_per_s"],
        len(manifest["rows_by_node"]),
        ledger.manifest_uri(cfg.output, run_id),
        f", expired {len(expired)} old run(s)" if expired else "",
    )
    return manifest


def _score(cfg, todo, fields, run_date, run_id, input_size, art, art_bytes, triton_model, secret) -> tuple[dict, int]:
    """The Ray pipeline over the files to read; returns the run's manifest (not yet committed)."""
    ray = init_ray_for(cfg)
    nodes = cluster_nodes() + (node_types(cfg.cluster_config) if cfg.autoscaling and cfg.cluster_config else [])
    plan = plan_replicas(
        nodes,
        cfg.device,
        cfg.replicas,
        cfg.cpus_per_replica,
        cfg.gpus_per_replica,
        cfg.inference_threads,
        cfg.autoscaling,
    )
    plan.check(nodes, cfg.autoscaling)
    gpus = plan.gpus if not cfg.triton_url else 0.0  # through Triton the server holds the GPUs
    log.info(
        "model replicas: %d..%d, each %g CPU + %g GPU, %d threads",
        plan.min_replicas,
        plan.max_replicas,
        plan.cpus,
        gpus,
        plan.threads,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job logs its own progress lines
    memory = ACTOR_MEMORY_FACTOR * art_bytes + ACTOR_MEMORY_BASE
    wait_for_first_replica(ray, plan, gpus, memory, cfg)
    # Replicas start as nodes have room and the pool grows as they arrive: no start-up gate (Ray Data's
    # gate fails on the first replica that dies while loading), a dead one replaced a bounded number of times.
    ctx.wait_for_min_actors_s = 0
    ctx.max_consecutive_actor_init_deaths = REPLICA_INIT_DEATHS
    ctx.execution_no_progress_timeout_s = max(ctx.execution_no_progress_timeout_s, cfg.wait_for_replicas_s)
    ctx.max_tasks_in_flight_per_actor = TASKS_IN_FLIGHT_PER_REPLICA
    set_retries(ctx)
    # Decoded blocks of about one model batch: the model starts after one batch is decoded (not a whole
    # read block), and each model call's rows come out (and are written) as soon as they are scored.
    ctx.target_max_block_size = max(MIN_BLOCK_BYTES, batch_bytes(cfg.batch_size, input_size))
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=max(MIN_IN_FLIGHT_BYTES, IN_FLIGHT_BATCHES * plan.max_replicas * ctx.target_max_block_size)
    )

    # The files to read travel as Arrow listing blocks cut by the bytes they list (at least a few per decode
    # CPU); each decode task reads its own files once.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ds = ray.data.from_arrow(
        input_blocks(todo, cfg.block_bytes, blocks.BLOCKS_PER_CPU * max(cpus, 1), cfg.files_per_block)
    )
    decoder = Decoder(
        input_size,
        cfg.max_pixels,
        study_keys=secret is not None,  # each worker reads the secret from its own environment
        max_frames=cfg.max_frames,
        max_file_bytes=cfg.max_file_bytes,
        input_root=cfg.input,
    )
    # The decoder's chunks: its prepared frames leave the task a chunk at a time.
    ds = ds.map_batches(decoder.chunks, batch_size=DECODE_BATCH, num_cpus=plan.decode_cpus, batch_format="numpy")
    stage_kwargs = dict(
        artifact=cfg.model,
        engine=cfg.engine,
        variant=cfg.variant,
        threads=plan.threads,
        triton_url=cfg.triton_url,
        triton_model=triton_model,
        triton_protocol=cfg.triton_protocol,
        triton_timeout_s=cfg.triton_timeout_s,
        triton_retries=cfg.triton_retries,
        triton_backoff_s=cfg.triton_backoff_s,
        triton_batch=cfg.triton_batch,
        triton_in_flight=cfg.triton_in_flight,
        simulated_batch_s=cfg.simulated_batch_s,
        autocast=cfg.autocast,
    )
    ds = ds.map_batches(
        ScoreStage,
        fn_constructor_kwargs=stage_kwargs,
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(
            min_size=plan.min_replicas,
            max_size=plan.max_replicas,
            max_concurrent_calls_per_actor=CALLS_IN_FLIGHT_PER_REPLICA,
        ),
        num_cpus=plan.cpus,
        num_gpus=gpus,
        memory=memory,
        batch_format="numpy",
        zero_copy_batch=True,
    )
    # Upsampling, thresholds and PNG masks on CPU tasks after the replicas (not in them).
    ds = ds.map_batches(
        Postprocess(art, run_id), batch_size=cfg.batch_size, num_cpus=plan.decode_cpus, batch_format="numpy"
    )
    if cfg.dicom_output:  # DICOM-SEG + SR of the DICOM rows (re-read from their URIs), on CPU tasks too
        writer = dicom_out.DicomWriter(
            cfg.dicom_output,
            run_id,
            art.get("model_name", "model"),
            art.get("model_version", "unsaved"),
            _version(),
            pacs=_pacs_sender(cfg),
        )
        ds = ds.map_batches(writer, batch_size=None, num_cpus=plan.decode_cpus, batch_format="pyarrow")

    rdir = ledger.run_dir(cfg.output, run_date, run_id)
    progress = ray.remote(num_cpus=0)(Progress).remote()
    if not cfg.triton_url:
        from adcore.engine import choose_engine

        fields["engine"] = choose_engine(cfg.engine, "cuda" if gpus else "cpu", cfg.variant)
    fields = {
        **fields,
        "variant": cfg.variant,
        "replicas": {"min": plan.min_replicas, "max": plan.max_replicas, "cpus": plan.cpus, "gpus": gpus},
    }
    sink = RunSink(
        cfg.output,
        rdir,
        fields,
        rows_per_write=cfg.rows_per_file,
        progress=progress,
        path_privacy=cfg.path_privacy,
        path_map=cfg.path_map,
    )
    ledger.write_run_stub(rdir, sink.manifest)  # before any part: a salvage of this run needs its fields
    total = int(fields["input_files"])
    with _ProgressLog(progress, total, cfg.progress_every_s, int(fields["unchanged_files"]), cfg.progress):
        # Write tasks of their own (other resources than the stages before them, so Ray Data does not
        # fuse them): postprocessing and DICOM writing scale with the cluster, each block is written as it comes.
        ds.write_datasink(sink, ray_remote_args={"num_cpus": plan.decode_cpus * WRITE_CPU_SHARE})
    return sink.committed, sink.files_seen


def wait_for_first_replica(ray, plan, gpus: float, memory: float, cfg: ScoreConfig) -> None:
    """Wait (with progress lines) until a node can hold one model replica; the autoscaler is asked for the
    minimum replicas meanwhile. More replicas join the pool as more nodes arrive."""
    need = {"CPU": plan.cpus, **({"GPU": gpus} if gpus else {}), "memory": memory}
    if cfg.autoscaling:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in need.items() if k != "memory"}] * plan.min_replicas)
    what = f"{plan.cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "") + f" + {memory / 2**30:.1f} GiB"
    t0 = time.monotonic()
    while True:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if any(all(n["Resources"].get(k, 0) >= v for k, v in need.items()) for n in nodes):
            return
        waited = time.monotonic() - t0
        if waited >= cfg.wait_for_replicas_s:
            raise SystemExit(
                f"no node could hold a model replica ({what}) within --wait-for-replicas-s "
                f"{cfg.wait_for_replicas_s:g}: start such a node (or let the autoscaler), or wait longer"
            )
        log.info(
            "waiting for a node that can hold the first model replica (%s): %d node(s) up, none large enough; "
            "%.0f s of %.0f s",
            what,
            len(nodes),
            waited,
            cfg.wait_for_replicas_s,
        )
        time.sleep(min(max(cfg.progress_every_s, 1.0), max(cfg.wait_for_replicas_s - waited, 0.1)))


def set_retries(ctx) -> None:
    """Retry a map or write task that failed on a transient error, and a replica's call that raised one."""
    ctx.retried_map_errors = list(TRANSIENT_ERRORS)
    ctx.max_map_retries = MAP_RETRIES
    ctx.actor_task_retry_on_errors = [ConnectionError, TimeoutError]


# Locations that must not overlap (one inside the other), and why.
APART = (
    ("output", "input", "the job would list and score its own outputs"),
    ("dicom_output", "input", "its objects carry patient data and would be scored"),
    ("dicom_output", "output", "its objects carry patient data; --output is for analysts"),
    ("path_map", "input", "the map names patients' paths and would be scored"),
    ("path_map", "output", "the map names patients' paths; --output is for analysts"),
)


def _real(uri: str) -> str:
    """``uri`` for comparison: local paths with symbolic links resolved, ending in "/"."""
    return (uri if storage.is_s3(uri) else os.path.realpath(storage.local_path(uri))).rstrip("/") + "/"


def _check_apart(cfg: ScoreConfig) -> None:
    """Refuse locations that lie inside one another (compared by real path, links resolved)."""
    for a, b, why in APART:
        if b == "input" and dicomweb.is_dicomweb(cfg.input):
            continue  # a PACS lies inside no folder
        if getattr(cfg, a) and getattr(cfg, b):
            x, y = _real(getattr(cfg, a)), _real(getattr(cfg, b))
            if x.startswith(y) or y.startswith(x):
                flag_a, flag_b = a.replace("_", "-"), b.replace("_", "-")
                raise SystemExit(f"--{flag_a} and --{flag_b} must not lie inside one another: {why}")


def _check_dicomweb_input(cfg: ScoreConfig) -> ScoreConfig:
    """A DICOMweb --input checked, with its filters; ``auto`` privacy resolved (pseudonymize for it)."""
    if not dicomweb.is_dicomweb(cfg.input):
        if cfg.qido_study_date or cfg.qido_modality:
            raise SystemExit("--qido-study-date and --qido-modality filter a DICOMweb --input (dicomweb+http://...)")
        return replace(cfg, path_privacy="keep") if cfg.path_privacy == "auto" else cfg
    qido.root_of(cfg.input)
    qido.Filters(cfg.qido_study_date, cfg.qido_modality).check()
    if cfg.path_privacy != "auto":
        return cfg
    if len(os.environ.get(SECRET_ENV, "").encode()) < S.MIN_SECRET_BYTES or not cfg.path_map:
        raise SystemExit(
            f"a DICOMweb --input's URIs hold DICOM UIDs: set {SECRET_ENV} (>= {S.MIN_SECRET_BYTES} bytes) and "
            "--path-map URI (a restricted place), or choose --path-privacy keep"
        )
    return replace(cfg, path_privacy="pseudonymize")


def _check_privacy_flags(cfg: ScoreConfig) -> None:
    """One-line refusals of an inconsistent --path-privacy / --path-map / secret."""
    if cfg.path_privacy not in S.PATH_PRIVACY:
        raise SystemExit(f"--path-privacy {cfg.path_privacy!r}: expected one of {', '.join(S.PATH_PRIVACY)}")
    if cfg.path_privacy == "keep" and cfg.path_map:
        raise SystemExit("--path-map is only written with --path-privacy pseudonymize")
    if cfg.path_privacy == "pseudonymize":
        if not cfg.path_map:
            raise SystemExit("--path-privacy pseudonymize needs --path-map URI (a restricted place for key -> path)")
        try:
            S.check_secret(os.environ.get(SECRET_ENV, "").encode())
        except ValueError as e:
            raise SystemExit(f"--path-privacy pseudonymize: {e}") from None
    try:
        ledger.check_privacy(cfg.output, cfg.path_privacy)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adcore")
    except PackageNotFoundError:
        return "unknown"


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


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> ScoreConfig:
    return parse_config(ScoreConfig, argv, __doc__.split("\n")[0], prog=prog)


def cli(argv: list[str] | None = None, prog: str = PROG) -> None:
    """The command line: parse, score, errors a user can fix in one line."""
    run_command(lambda: main(parse_args(argv, prog)), prog)


if __name__ == "__main__":
    cli()

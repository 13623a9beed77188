"""Distributed training with Ray Train: ``adcore.training.train`` on N workers (DDP).

    python jobs/train.py --data s3://bucket/bmad/brain --preset fusion-small \
        --output s3://bucket/models/brain --storage s3://bucket/ray --num-workers 4 --use-gpu

The train split is streamed (``adcore.training.stream``): the driver lists it once (local folder or
``s3://`` prefix, no image read), cuts the listing into one equal shard per rank, and Ray Data
decodes and resizes each shard in CPU tasks, which keep the frames in a cache beside the checkpoints
(``adcore.training.frame_cache``) that later passes and runs read instead of the images; a rank holds
only the batches in flight and synthesises anomalies with a seed of (seed, epoch, image). Validation
reads only its ``--max-valid`` images (from S3: each node copies just those, chosen from the listing).
Families that index their images (``MethodFamily.needs_images_in_memory``, DRA) and ``--no-stream``
load each rank's shard into memory instead. Every stage-2 epoch reports loss and validation AUROC
through ``ray.train.report``; rank 0 attaches the training state as a checkpoint in ``--storage``.
A restarted worker group (``--max-failures``) or a rerun with the same ``--storage`` and run name
resumes from the latest checkpoint.
Rank 0 saves the artifact to ``--output``. With ``--use-gpu`` each worker trains on its GPU
(model, batches, loss, optimiser; NCCL; autocast unless ``--no-mixed-precision``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from adcore import storage
from adcore.cli import hidden, parse_command, run_command, setup_logging
from adcore.data import bmad
from adcore.errors import DataNotFoundError, UserError
from adcore.models import create, family_for
from adcore.training import TrainConfig, TrainHooks, dist, refuse_unused_flags, train
from adcore.training.frame_cache import open_cache
from adcore.training.loop import SMOKE_IMAGES, model_overrides
from adcore.training.skipped import SkippedImages
from adcore.training.stream import (
    StreamedBatches,
    decode_train,
    image_level_only,
    sampled_files,
    shard_listing,
    train_listing,
)
from jobs.common import init_ray, local_copy, local_files, run_name, storage_args
from jobs.console import quiet_ray_loggers

log = logging.getLogger("jobs.train")

PROG = "python jobs/train.py"
STATE_FILE = "state.pt"  # the training state inside each checkpoint folder
KEEP_CHECKPOINTS = 2  # bounded storage; resuming only needs the latest
RUN_PREFIX = "train"  # run names are train-<hash of --output> unless --run-name is given
TRAIN_DATASET = "train"  # rank r reads the Ray Dataset named train_<r>
DECODE_BLOCK_ROWS = 64  # listing rows per Ray Data block: the unit of parallel decoding
FRAME_CACHE_FOLDER = "frame-cache"  # under --storage, beside the runs' checkpoints
SHUFFLE_BUFFER = 256  # decoded images a rank shuffles among (about 150 MB at 384 px)
SYNTH_PREFETCH = 2  # batches a rank reads and synthesises in a thread while it trains on the current one


@dataclass
class JobConfig:
    """The distributed side; everything about the model and training is in ``TrainConfig``."""

    data: str  # BMAD-layout folder or s3:// prefix
    output: str  # artifact folder or s3:// prefix
    storage: str | None = None  # checkpoints (local or s3://); default: <output>-checkpoints
    run_name: str | None = None  # default: derived from --output, so reruns resume
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2  # worker-group restarts, each resuming from the latest checkpoint
    ray_address: str | None = None  # Ray cluster to join; default: RAY_ADDRESS or a new local cluster
    timings: str | None = hidden(None)  # rank 0 writes its timings here as JSON (local or s3://; benchmarks)
    stream: bool = True  # stream the train split through Ray Data; --no-stream: each rank loads its shard
    decode_cpus: float = 1.0  # CPUs per decode task (0 when the training workers leave none free on a fixed cluster)
    decode_tasks: int = 4  # decode tasks in flight per rank's dataset
    frame_cache: bool = True  # keep the decoded frames for later passes and runs; --no-frame-cache: decode each pass
    frame_cache_dir: str | None = None  # where (local or s3://); default: <storage>/frame-cache

    def storage_uri(self) -> str:
        return self.storage or self.output.rstrip("/") + "-checkpoints"

    def name(self) -> str:
        return self.run_name or run_name(RUN_PREFIX, self.output)

    def frame_cache_uri(self) -> str:
        return self.frame_cache_dir or self.storage_uri().rstrip("/") + "/" + FRAME_CACHE_FOLDER


def make_wrap(world_size: int) -> Callable[[nn.Module], nn.Module]:
    """The loop's ``wrap`` hook: DDP over the trainable parameters of a module already on its device.

    DDP registers only parameters with ``requires_grad``, so each stage's wrap syncs
    exactly that stage's parameter set (gloo on CPU, NCCL on GPU: Ray's process group).
    DDP's search for parameters without a gradient (an extra graph walk per step) runs only
    for a module that asks for it (``adcore.training.dist.FIND_UNUSED_ATTR``).
    """
    import ray.train.torch

    def wrap(module: nn.Module) -> nn.Module:
        if world_size == 1:
            return module
        return ray.train.torch.prepare_model(
            module,
            move_to_device=False,
            parallel_strategy="ddp",
            parallel_strategy_kwargs={"find_unused_parameters": dist.needs_unused_parameter_search(module)},
        )

    return wrap


class Reporter:
    """The loop's ``report`` hook: metrics from every rank, the state as a checkpoint from rank 0."""

    def __init__(self, rank: int, epochs: int | None):
        self.rank, self.epochs = rank, epochs
        self.started = time.monotonic()
        self.seconds = 0.0  # time inside ray.train.report, incl. checkpoint upload (benchmarks)

    def __call__(self, metrics: dict[str, Any], state_fn: Callable[[], dict] | None) -> None:
        import ray.train

        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="adcore-ckpt-") as tmp:
            checkpoint = None
            if self.rank == 0 and state_fn is not None:
                torch.save(state_fn(), os.path.join(tmp, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        self.seconds += time.monotonic() - t0
        if self.rank == 0 and "step" in metrics:  # a checkpoint inside an epoch (--checkpoint-every-min)
            log.info(
                "[train] %s checkpoint in epoch %s at step %s/%s",
                metrics.get("stage", ""),
                metrics.get("epoch"),
                metrics["step"],
                metrics.get("steps"),
            )
        elif self.rank == 0:
            log.info(progress_line(metrics, self.epochs, time.monotonic() - self.started))


def progress_line(metrics: dict[str, Any], epochs: int | None, seconds: float) -> str:
    """``[train] fusion epoch 3/8 loss ...``; without a fixed number of epochs (the time budget ends
    the stage) ``[train] fusion epoch 3 loss ...``."""

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    total = metrics.get("epochs", epochs)
    return (
        f"[train] {metrics.get('stage', '')} epoch {metrics.get('epoch')}{'' if total is None else f'/{total}'} "
        f"loss {fmt(metrics.get('loss'))} "
        f"val_image_auroc {fmt(metrics.get('val_image_auroc'))} "
        f"val_pixel_auroc {fmt(metrics.get('val_pixel_auroc'))} ({seconds:.1f} s)"
    )


def load_state(checkpoint) -> dict | None:
    """The training state in a checkpoint reported by :class:`Reporter`, or None."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        file = os.path.join(path, STATE_FILE)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"checkpoint {checkpoint.path} has no {STATE_FILE}")
        return torch.load(file, map_location="cpu", weights_only=True)


def train_worker(config: dict) -> None:
    """Ray Train's per-worker function: one rank of ``adcore.training.train``."""
    import ray.train
    import ray.train.torch

    started_unix, started = time.time(), time.monotonic()
    setup_logging()
    job, cfg = JobConfig(**config["job"]), TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    resume = load_state(ray.train.get_checkpoint())
    if resume is not None and rank == 0:
        at = f" step {resume['step']}" if resume.get("step") else ""
        log.info("[train] resuming from checkpoint: stage %s, epoch %s%s", resume.get("stage"), resume.get("epoch"), at)
    streamed = config.get("stream")
    data = worker_data(job, streamed)
    data_s = time.monotonic() - started
    reporter = Reporter(rank, cfg.epochs)
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    hooks = TrainHooks(
        rank=rank, world_size=world, device=device, wrap=make_wrap(world), report=reporter, resume=resume
    )
    if streamed:
        # Ray Data logs three INFO lines per rank and pass (start, plan, finish) and its issue detector's
        # advice to this worker's console; the [train] lines suffice (its ray-data log keeps them).
        quiet_ray_loggers(("ray.data",))
        shard = ray.train.get_dataset_shard(f"{TRAIN_DATASET}_{rank}")
        hooks.train_batches = StreamedBatches(
            _epoch_iterator(shard, cfg),
            streamed["rows_per_rank"],
            cfg.batch_size,
            cfg.anomaly_share,
            seed=cfg.seed,
            image_level_only=streamed["image_level_only"],
            skipped=SkippedImages(job.data, cfg.max_bad_share, total=streamed["images"]),
            prefetch=SYNTH_PREFETCH,
        )
        hooks.train_images = streamed["images"]
    train(data, cfg, output=job.output, hooks=hooks)
    if rank == 0 and job.timings:
        timings = {
            "worker_start_unix": started_unix,
            "data_s": data_s,
            "worker_s": time.monotonic() - started,
            "report_s": reporter.seconds,
            "world_size": world,
            "streamed": bool(streamed),
            "peak_rss_mb": _peak_rss_mb(),
        }
        storage.write_bytes(job.timings, json.dumps(timings).encode())


def worker_data(job: JobConfig, streamed: dict | None) -> str:
    """The local folder ``train`` reads on this node: the data itself when local; from S3, this node's
    copy of the validation images the run uses (streamed) or of the whole prefix (images in memory)."""
    if not streamed:
        return local_copy(job.data)
    return local_files(job.data, streamed["valid_files"], also=(bmad.CATEGORIES_FILE,))


def _epoch_iterator(shard, cfg: TrainConfig) -> Callable[[int], Any]:
    """``epoch -> batches`` of a rank's Ray Data shard, shuffled within a buffer with a seed of the epoch."""

    def iterate(epoch: int):
        return shard.iter_batches(
            batch_size=cfg.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=SHUFFLE_BUFFER,
            local_shuffle_seed=cfg.seed * 1_000_003 + epoch,
        )

    return iterate


def train_datasets(job: JobConfig, cfg: TrainConfig) -> tuple[dict, dict]:
    """One Ray Dataset per rank (its shard of the train split, decoded in CPU tasks) and what the
    ranks need to know about them; ``({}, {})`` when the family keeps its images in memory."""
    import ray.data

    model = create(cfg.preset, weights=cfg.weights or None, tiny=cfg.tiny, **model_overrides(cfg))
    if not job.stream or family_for(model).needs_images_in_memory:
        return {}, {}
    listing = train_listing(job.data, cfg.labelled, cfg.seed)
    if cfg.smoke_test:
        listing = listing.take(_smoke_rows(listing.column("label").to_numpy()))
    shards = [shard_listing(listing, r, job.num_workers) for r in range(job.num_workers)]
    cpus = _decode_cpus(job)
    cache = open_cache(job.frame_cache_uri(), listing, model.input_size) if job.frame_cache else None
    datasets = {}
    for r, shard in enumerate(shards):
        blocks = [shard.slice(i, DECODE_BLOCK_ROWS) for i in range(0, shard.num_rows, DECODE_BLOCK_ROWS)]
        datasets[f"{TRAIN_DATASET}_{r}"] = ds = ray.data.from_arrow(blocks).map_batches(
            decode_train,
            fn_kwargs={"size": model.input_size, "cache": cache},
            batch_size=DECODE_BLOCK_ROWS,  # a block per call: one frame-cache file each
            num_cpus=cpus,
            compute=ray.data.TaskPoolStrategy(size=max(1, min(job.decode_tasks, len(blocks)))),
        )
        ds.context.enable_progress_bars = False  # one bar per rank and epoch; the [train] lines say it
    # From S3, each node copies only the validation images the run uses, chosen here from the listing.
    valid = sampled_files(job.data, "valid", cfg.valid_limit()) if storage.is_s3(job.data) else []
    # Every rank holds every labelled anomaly (shard_listing), so each rank's count is the listing's.
    info = {
        "rows_per_rank": shards[0].num_rows,
        "images": listing.num_rows,
        "image_level_only": image_level_only(listing),
        "valid_files": valid,
    }
    log.info(
        "streaming %d training images: %d per rank, decoded at %d px in Ray Data tasks",
        info["images"],
        info["rows_per_rank"],
        model.input_size,
    )
    return datasets, info


def _decode_cpus(job: JobConfig) -> float:
    """``--decode-cpus``, the CPUs each decode task asks for, so that an autoscaling cluster starts
    CPU nodes for them; 0 when the training workers hold every CPU a fixed cluster has (a laptop, a
    test cluster): decoding then shares their cores instead of waiting forever for a free one."""
    import ray

    free = _cluster_cpus(ray) - job.num_workers * job.cpus_per_worker
    if free >= job.decode_cpus:
        return job.decode_cpus
    log.warning(
        "the training workers take every CPU (%.0f free): decode tasks share their cores (raise the "
        "cluster's CPUs or lower --cpus-per-worker for dedicated decoding)",
        max(free, 0),
    )
    return 0.0


def _cluster_cpus(ray) -> float:
    """The CPUs the cluster can reach: its autoscaler's limit (Ray Data and Train read the same), else
    what it has now (a fixed cluster)."""
    try:
        from ray._private.state import state

        most = (state.get_max_resources_from_cluster_config() or {}).get("CPU")
    except Exception:  # a private API: a Ray without it is treated as a fixed cluster
        most = None
    return float(most) if most else ray.cluster_resources().get("CPU", 0)


def _smoke_rows(labels) -> list[int]:
    """The smoke test's images: ``SMOKE_IMAGES`` normal ones spread evenly, and every labelled anomaly."""
    normal = [i for i, v in enumerate(labels) if v == 0]
    step = max(1, len(normal) // SMOKE_IMAGES)
    return normal[::step][:SMOKE_IMAGES] + [i for i, v in enumerate(labels) if v == 1]


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_trainer(job: JobConfig, cfg: TrainConfig):
    """A ``TorchTrainer`` for the job (not started)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    path, fs = storage_args(job.storage_uri())
    datasets, streamed = train_datasets(job, cfg)
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": asdict(job), "train": asdict(cfg), "stream": streamed},
        datasets=datasets or None,
        # Each rank reads its own dataset whole (the shards are cut by the driver, equal in size);
        # order preserved so a rerun or a resumed run sees the same batches.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        scaling_config=ScalingConfig(
            num_workers=job.num_workers,
            use_gpu=job.use_gpu,
            resources_per_worker={"CPU": job.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=job.name(),
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        ),
    )


def main(job: JobConfig, cfg: TrainConfig):
    """Train on the cluster; returns Ray's ``Result`` (artifact at ``job.output``)."""
    if not storage.exists(job.data):
        raise DataNotFoundError(f"--data {job.data}: no such folder or prefix")
    job = dataclasses.replace(
        job,
        data=storage.absolute(job.data),
        output=storage.absolute(job.output),
        storage=storage.absolute(job.storage) if job.storage else None,
        frame_cache_dir=storage.absolute(job.frame_cache_dir) if job.frame_cache_dir else None,
    )
    init_ray(job.ray_address)
    started = time.monotonic()
    try:
        result = build_trainer(job, cfg).fit()
    except Exception as e:  # a worker's UserError (e.g. too many unreadable images) is the user's one line
        user = user_error_of(e)
        if user is None:
            raise
        raise user from e
    last = result.metrics or {}
    print(f"[train] run {job.name()} in {job.storage_uri()}: {time.monotonic() - started:.1f} s", flush=True)
    if last:
        print(progress_line(last, cfg.epochs, last.get("elapsed_s", 0.0)), flush=True)
    print(f"[train] saved {job.output}", flush=True)
    return result


def user_error_of(exc: BaseException) -> UserError | None:
    """The :class:`UserError` a training worker raised, inside Ray Train's failure (its workers'
    errors, Ray's task-error wrapper, their causes), or None."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # Ray's wrapper: its message carries the remote traceback
        if isinstance(e, UserError) and not isinstance(cause, BaseException):
            return e
        todo += [cause, e.__cause__, e.__context__]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
    return None


def parse(argv: list[str] | None = None, prog: str = PROG) -> tuple[JobConfig, TrainConfig]:
    """The job's configs from the command line; schedule flags the preset does not read are refused."""
    parsed = parse_command((JobConfig, TrainConfig), argv, __doc__.split("\n")[0], prog=prog)
    refuse_unused_flags(parsed.configs[1], parsed.given)
    return parsed.configs


def cli(argv: list[str] | None = None, prog: str = PROG) -> None:
    """The command line: parse, train, errors a user can fix in one line."""
    run_command(lambda: main(*parse(argv, prog)), prog)


if __name__ == "__main__":
    cli()

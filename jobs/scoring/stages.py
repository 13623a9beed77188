"""The scoring job's Ray Data stages: decode (CPU tasks), score (model replicas), postprocess (CPU tasks).

All are plain callables on column batches, testable without Ray:

* :class:`Decoder` (stateless task): file bytes -> one row per frame with the prepared
  uint8 pixels (``[1, S, S]``: a grey plane, broadcast to three channels by the replica; ``[3, S, S]``
  in a chunk holding a colour frame), or one error row; frames already scored are dropped (a file that
  is wholly done becomes one ``skipped`` marker row, counted for progress, never written).
* :class:`ScoreStage` (model replicas, actors): ``adcore.scorer.Scorer`` with its network
  backend (in-process torch, onnxruntime, or Triton) and FAISS head, so a batch crosses no
  process boundary between model and head. Returns raw scores and patch-grid maps.
* :class:`Postprocess` (CPU tasks): ``adcore.scorer.postprocess`` with the artifact's
  calibration (map upsampling, thresholds, PNG masks), returning a ``pyarrow.Table`` in
  ``schema.SCHEMA`` plus the node each row was scored on. For a head with categories the
  replicas also return per-category scores; the rows get ``category`` and ``category_scores``.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from adcore import storage
from adcore.data.decode import DEFAULT_MAX_FRAMES, decode_image
from adcore.data.errors import DecodeError
from adcore.scorer import postprocess, prepare_plane, to_uint8
from jobs.scoring import dicomweb, qido
from jobs.scoring import schema as S

log = logging.getLogger(__name__)

# Columns the decoder emits besides the pixels.
ROW_COLUMNS = (
    "image_uri", "image_key", "content_sha256", "frame", "height", "width", "modality", "study_key", "status",
    "error", "file_size", "file_version",
)  # fmt: skip
# Prepared pixels a decode task holds before handing a chunk of rows on (~220 frames at S=224).
DEFAULT_CHUNK_BYTES = 32 * 2**20
# Files a decode task reads at once (GETs wait on the store, not the CPU): a bounded thread pool.
READ_THREADS = 8
# Listed bytes those reads may hold ahead of decoding (at least one file is always read).
READ_AHEAD_BYTES = 256 * 2**20


class Decoder:
    """Listed files -> frames prepared for the network (a Ray Data batch function).

    A batch holds listing rows (``uri``, ``size``, ``version``, ``prior_sha``,
    ``prior_done``: see ``ledger.plan_inputs``); each file is read here, once, inside the
    task (or a batch holds ``bytes`` and ``path`` already read: benchmarks, tests). A read
    that fails becomes an error row of kind ``read`` (transient: the next run retries it).

    Before anything is read, a file larger than ``max_file_bytes`` in the listing is one error
    row of kind ``too_large``, and a local entry that is not a regular file inside
    ``input_root`` (a FIFO, socket, device, folder link, or a link leading outside) one of kind
    ``not_a_file``; a local read stops at the listed size. Prepared frames leave in chunks of
    at most ``chunk_bytes`` (:meth:`chunks`), so a file of thousands of frames never holds
    them all prepared at once.

    Args:
        input_size: The network's square input size S.
        max_pixels: Files whose header announces more pixels are error rows (kind too_large),
            refused before any pixel is decoded.
        study_keys: Key ``study_key`` with ``ADCORE_STUDY_KEY_SECRET`` (the job asks when its
            driver has the secret); False leaves it null.
        max_frames: Files whose header announces more frames are error rows (kind
            too_many_frames), refused before any pixel is decoded.
        max_file_bytes: Listed files larger than this are error rows (kind too_large), never
            read; None: no bound (batches of bytes already read).
        input_root: The listed local folder (``--input``): local files must be regular files
            inside it. Empty: only the regular-file check.
        chunk_bytes: Prepared pixels one chunk of rows holds at most (at least one row).
        read_threads: Files read at once (a thread pool per call; 1: one after the other).
        read_ahead_bytes: Listed bytes of the files read ahead of the one being decoded, at most.

    The secret is read from the environment of the worker that decodes, never carried by the
    decoder: a worker without it fails with one line (every node of a cluster needs it).
    """

    def __init__(
        self,
        input_size: int,
        max_pixels: int,
        study_keys: bool = False,
        *,
        max_frames: int = DEFAULT_MAX_FRAMES,
        max_file_bytes: int | None = None,
        input_root: str = "",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        read_threads: int = READ_THREADS,
        read_ahead_bytes: int = READ_AHEAD_BYTES,
    ):
        self.input_size = input_size
        self.max_pixels = max_pixels
        self.max_frames = max_frames
        self.max_file_bytes = max_file_bytes
        self.input_root = input_root
        self.chunk_rows = max(1, chunk_bytes // (3 * input_size * input_size))  # colour frames: 3 planes
        self.study_keys = study_keys
        self.read_threads, self.read_ahead_bytes = max(1, read_threads), read_ahead_bytes
        self._reader = storage.Reader()  # one filesystem per task
        self._wado = qido.WadoReader()  # DICOMweb inputs: its client is made in the task

    @functools.cached_property
    def _secret(self) -> bytes | None:
        if not self.study_keys:
            return None
        secret = S.study_key_secret()
        if secret is None:
            raise RuntimeError(f"{S.SECRET_ENV} is not set on this node; the job's driver has it: set it on every node")
        return secret

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_secret"}  # read again where it is unpickled

    def __repr__(self) -> str:  # Ray may print the callable: never the secret
        return (
            f"Decoder(input_size={self.input_size}, max_pixels={self.max_pixels}, max_frames={self.max_frames}, "
            f"max_file_bytes={self.max_file_bytes}, study_keys={self.study_keys})"
        )

    def _files(self, batch: dict[str, np.ndarray]):
        """(uri, image key, (bytes, sha256) or why not, size, version, prior sha, prior done frames) per file,
        in the batch's order; up to ``read_threads`` files are read at once (:func:`_read_ahead`)."""
        if "bytes" in batch:
            for data, path in zip(batch["bytes"], batch["path"]):
                data = bytes(data)
                got = self._too_large(len(data)) or (data, S.content_sha256(data))
                yield str(path), str(path), got, len(data), None, None, frozenset()
            return
        listed = []
        for i, uri in enumerate(batch["uri"]):
            uri, size = str(uri), int(batch["size"][i])
            prior = batch["prior_done"][i] if "prior_done" in batch else None
            done = frozenset() if prior is None or not len(prior) else frozenset(int(f) for f in prior)
            key = str(batch["image_key"][i]) if "image_key" in batch else uri  # keys are made by the driver
            listed.append((uri, key, size, _text(batch["version"][i]), _text(batch["prior_sha"][i]), done))
        reads = _read_ahead(self._read, [(e[0], e[2]) for e in listed], self.read_threads, self.read_ahead_bytes)
        for (uri, key, size, version, prior_sha, done), got in zip(listed, reads):
            yield uri, key, got, size, version, prior_sha, done

    def _read(self, uri: str, size: int) -> tuple[bytes, str] | _Refused | OSError:
        """The file's bytes and their SHA-256 (hashed while reading), or why it was not read (refused,
        or a failed read: retried next run)."""
        root = self.input_root or uri
        if dicomweb.is_dicomweb(uri):  # listed by QIDO-RS with no size: the read itself is bounded
            try:
                data = self._wado.read(uri, self.max_file_bytes)
                return data, hashlib.sha256(data).hexdigest()
            except dicomweb.TooLarge as e:
                return _Refused(S.TOO_LARGE, f"WADO-RS answer {e} exceeds max_file_bytes={self.max_file_bytes}")
            except OSError as e:
                return e
        try:
            if not storage.is_s3(uri):  # the file's type first: a FIFO or a device is never opened
                storage.check_regular_file(storage.local_path(uri), storage.local_path(root))
            refused = self._too_large(size)
            if refused:
                return refused
            digest = hashlib.sha256()
            return self._reader.read_listed(uri, size, root, digest), digest.hexdigest()
        except storage.NotAFile as e:
            return _Refused(S.NOT_A_FILE, str(e))
        except OSError as e:  # gone or changed since the listing, or the store failed: retried next run
            return e

    def _too_large(self, size: int) -> _Refused | None:
        if self.max_file_bytes is not None and size > self.max_file_bytes:
            return _Refused(S.TOO_LARGE, f"{size} bytes exceeds max_file_bytes={self.max_file_bytes}")
        return None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All of :meth:`chunks` as one batch (tests, benchmarks; the job streams the chunks)."""
        parts = list(self.chunks(batch))
        channels = max(p["pixels"].shape[1] for p in parts)  # grey and colour chunks: three channels
        for p in parts:
            p["pixels"] = np.broadcast_to(p["pixels"], (len(p["pixels"]), channels, *p["pixels"].shape[2:]))
        return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}

    def chunks(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """One row per frame (or per refused or failed file), in batches of at most ``chunk_rows`` rows."""
        rows = _Rows(self.input_size)
        for uri, key, data, size, version, prior_sha, prior_done in self._files(batch):
            file = (uri, key, size, version)
            if isinstance(data, _Refused):
                rows.add(file, None, 0, S.STATUS_ERROR, S.format_error(data.kind, data.reason))
            elif isinstance(data, Exception):
                reason = f"{type(data).__name__}: {str(data)[:200]}"
                rows.add(file, None, 0, S.STATUS_ERROR, S.format_error(S.READ_ERROR, reason))
            else:
                for _ in self._frames(rows, file, *data, prior_sha, prior_done):
                    if len(rows) >= self.chunk_rows:
                        yield rows.take()
            if len(rows) >= self.chunk_rows:
                yield rows.take()
        if len(rows) or not rows.taken:
            yield rows.take()

    def _frames(self, rows: _Rows, file, data: bytes, sha: str, prior_sha, prior_done):
        """Adds one file's rows to ``rows``, one frame at a time (a generator: the caller may take a chunk)."""
        done = prior_done if prior_sha == sha else frozenset()
        try:
            name = qido.DECODE_NAME if dicomweb.is_dicomweb(file[0]) else file[0]  # no UID in any message
            frames = decode_image(data, name, max_pixels=self.max_pixels, max_frames=self.max_frames, frame_errors=True)
        except DecodeError as e:  # the file is one (error) row
            if 0 not in done:
                rows.add(file, sha, 0, S.STATUS_ERROR, S.format_error(e.kind, e.reason))
            else:
                rows.add(file, sha, 0, S.STATUS_SKIPPED)
            return
        todo = [f for f in frames if f.index not in done]
        n = len(frames)  # every row of the file says how many frames it has (salvage of a dead run's parts)
        del frames
        if not todo:
            rows.add(file, sha, 0, S.STATUS_SKIPPED, file_frames=n)
        for i, f in enumerate(todo):
            todo[i] = None  # the source frame goes once prepared
            key = S.study_key(f.study_uid, self._secret)
            if f.error is not None:  # this frame alone failed to decode: its own error row
                error = S.format_error(f.error.kind, f.error.reason)
                rows.add(file, sha, f.index, S.STATUS_ERROR, error, modality=f.modality, key=key, file_frames=n)
            else:
                px = to_uint8(prepare_plane(f.pixels, self.input_size))  # [1, S, S] for a grey frame
                hw = f.pixels.shape[:2]
                rows.add(file, sha, f.index, S.STATUS_OK, px=px, hw=hw, modality=f.modality, key=key, file_frames=n)
            yield


def _read_ahead(read: Callable, files: list[tuple[str, int]], threads: int, max_bytes: int) -> Iterator:
    """``read(uri, size)`` of each file, yielded in order, with up to ``threads`` reads running ahead of the
    caller while their listed sizes stay within ``max_bytes`` (the next file is always read)."""
    if threads <= 1 or len(files) <= 1:
        for uri, size in files:
            yield read(uri, size)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="read")
    try:
        pending, ahead, nxt = [], 0, 0
        for _ in files:
            while nxt < len(files) and len(pending) < threads and (not pending or ahead + files[nxt][1] <= max_bytes):
                pending.append((files[nxt][1], pool.submit(read, *files[nxt])))
                ahead += files[nxt][1]
                nxt += 1
            size, future = pending.pop(0)
            ahead -= size
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Refused:
    """A file refused before reading or decoding: one error row of ``kind``."""

    def __init__(self, kind: str, reason: str):
        self.kind, self.reason = kind, reason


class _Rows:
    """The decoder's output rows, taken as a batch of columns whenever a chunk is full."""

    def __init__(self, input_size: int):
        self.size = input_size
        self.blank = np.zeros((1, input_size, input_size), np.uint8)  # error/skip rows
        self.taken = 0
        self._reset()

    def _reset(self) -> None:
        self.cols: dict[str, list] = {c: [] for c in (*ROW_COLUMNS, FRAMES_COLUMN)}
        self.pixels: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.pixels)

    def add(
        self, file, sha, frame, status, error=None, px=None, hw=(None, None), modality=None, key=None, file_frames=1
    ) -> None:
        (uri, image_key, size, version) = file
        values = (uri, image_key, sha, frame, hw[0], hw[1], modality, key, status, error, size, version, file_frames)
        for c, v in zip((*ROW_COLUMNS, FRAMES_COLUMN), values):
            self.cols[c].append(v)
        self.pixels.append(self.blank if px is None else px)

    def take(self) -> dict[str, np.ndarray]:
        out = {c: np.array(v, dtype=object) for c, v in self.cols.items()}
        for c in ("frame", "height", "width", "file_size", FRAMES_COLUMN):
            out[c] = np.array([-1 if v is None else v for v in self.cols[c]], dtype=np.int64)
        # One grey plane per row [n, 1, S, S] (the replica broadcasts it); a chunk holding a colour frame is
        # [n, 3, S, S], its grey planes broadcast here.
        channels = max((len(p) for p in self.pixels), default=1)
        shape = (channels, self.size, self.size)
        out["pixels"] = (
            np.stack([np.broadcast_to(p, shape) for p in self.pixels])
            if self.pixels
            else np.zeros((0, *shape), np.uint8)
        )
        self.taken += 1
        self._reset()
        return out


class ScoreStage:
    """Network + FAISS head on batches of prepared frames: one model replica (a Ray actor).

    Returns raw scores and patch-grid maps (a few KB per frame); :class:`Postprocess` turns
    them into the output rows on CPU tasks.

    Args:
        artifact: Artifact URI (local or s3://).
        engine: ``"auto"`` (onnxruntime on CPU, torch on CUDA: ``adcore.engine.choose_engine``),
            ``"torch"`` or ``"onnx"``; ignored when ``triton_url`` is given.
        variant: ONNX variant, ``"fp32"``, ``"int8"`` or ``"fp16"`` (refused unless ``jobs/export.py
            --data`` measured it usable). The graphs come from the artifact's engine cache,
            exported once per artifact, never per replica.
        threads: Intra-op threads of torch / onnxruntime and FAISS's OpenMP threads.
        triton_url: ``host:port`` of a Triton server; the network then runs there.
        triton_model: Model name in Triton's repository.
        triton_protocol, triton_timeout_s, triton_retries, triton_backoff_s: Client settings.
        triton_batch: Largest batch sent in one request (<= the model's max_batch_size).
        triton_in_flight: Requests kept in flight over gRPC (HTTP keeps one).
        simulated_batch_s: Extra seconds each call sleeps (benchmarks of the orchestration alone).
        autocast: The in-process torch network on CUDA runs under the family's autocast dtype
            (``MethodFamily.autocast``, None: fp32); False: fp32 always. No effect on the CPU.
    """

    def __init__(
        self,
        artifact: str,
        engine: str = "auto",
        variant: str = "fp32",
        threads: int = 1,
        triton_url: str = "",
        triton_model: str = "",
        triton_protocol: str = "http",
        triton_timeout_s: float = 30.0,
        triton_retries: int = 3,
        triton_backoff_s: float = 0.5,
        triton_batch: int = 16,
        triton_in_flight: int = 4,
        simulated_batch_s: float = 0.0,
        autocast: bool = True,
    ):
        import faiss
        import torch

        from adcore import engine as engines

        _replica_death_hook()

        threads = max(1, threads)
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the actor's CPUs otherwise
        in_process = "torch" if triton_url else engine  # through Triton the network is replaced below: no export
        self.scorer = engines.load_scorer(artifact, engine=in_process, variant=variant, threads=threads)
        if self.scorer.calibration is None:
            raise ValueError(f"artifact {artifact} has no calibration; calibrate it on a validation split first")
        if autocast:
            self.scorer.use_autocast()
        self.node_id = _node_id()
        self.simulated_batch_s = simulated_batch_s
        if torch.cuda.is_available():
            log.info("model replica on node %s: CUDA device %s", self.node_id, torch.cuda.get_device_name())
        elif _ray_gpu_ids():
            log.warning(
                "model replica on node %s holds Ray GPU(s) %s but sees no CUDA device: runs on CPU",
                self.node_id,
                _ray_gpu_ids(),
            )
        if triton_url:
            from adcore.serving import TritonClient, TritonNetwork

            client = TritonClient(
                triton_url,
                triton_model or self.scorer.name,
                protocol=triton_protocol,
                timeout_s=triton_timeout_s,
                retries=triton_retries,
                backoff_s=triton_backoff_s,
            )
            self.scorer.network = TritonNetwork(
                client, max_batch=triton_batch, in_flight=triton_in_flight, outputs=engines.head_outputs(self.scorer)
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Prepared frames -> raw scores and patch-grid maps (post-processing runs after, on CPU)."""
        if self.simulated_batch_s:
            time.sleep(self.simulated_batch_s)
        n = len(batch["image_uri"])
        status = np.array([str(v) for v in batch["status"]], dtype=object)
        error = np.array([_text(v) for v in batch["error"]], dtype=object)
        g = self.scorer.model.grid
        raw_score = np.full(n, np.nan, np.float32)
        raw_map = np.zeros((n, g, g), np.float32)
        n_cat = len(self.scorer.categories)
        cat_scores = np.full((n, n_cat), np.nan, np.float32)
        ok = np.flatnonzero(status == S.STATUS_OK)
        splits_before = self.scorer.oom_splits
        for rows, out in self.scorer.iter_raw(_gather(batch["pixels"], ok), with_categories=True):
            idx = ok[rows]
            if isinstance(out, Exception):  # a failed model call marks its rows, the job goes on
                status[idx] = S.STATUS_ERROR
                error[idx] = S.format_error(S.INFERENCE_ERROR, f"{type(out).__name__}: {str(out)[:300]}")
                continue
            raw_score[idx], raw_map[idx] = out[0], out[1]
            if n_cat:
                cat_scores[idx] = out[2]
        # Text columns through _text: Ray turns an all-null column into float NaN, which would not merge.
        passed = {c: _texts(batch[c]) if c in TEXT_COLUMNS else batch[c] for c in PASSED_COLUMNS}
        node = np.full(n, self.node_id, dtype=object)
        scored = np.full(n, time.time(), dtype=np.float64)
        splits = np.zeros(n, np.int64)  # the batch's out-of-memory splits, on its first row
        if n:
            splits[0] = self.scorer.oom_splits - splits_before
        return {
            **passed,
            "status": status,
            "error": error,
            "raw_score": raw_score,
            "raw_map": raw_map,
            **({CATEGORY_SCORES_COLUMN: cat_scores} if n_cat else {}),
            NODE_COLUMN: node,
            TIME_COLUMN: scored,
            SPLITS_COLUMN: splits,
            **({FRAMES_COLUMN: batch[FRAMES_COLUMN]} if FRAMES_COLUMN in batch else {}),
        }


class Postprocess:
    """Raw scores and maps -> the output table: calibration, map upsampling, masks (CPU tasks).

    Loads only the artifact's config (its calibration), not its weights, so it runs as a plain
    task after the model replicas and keeps their GPUs on the network and head.
    """

    def __init__(self, artifact_config: dict, run_id: str):
        from adcore.calibration import Calibration

        if not artifact_config.get("calibration"):
            raise ValueError("the artifact has no calibration; calibrate it on a validation split first")
        self.calibration = Calibration.from_dict(artifact_config["calibration"])
        self.model_name = artifact_config.get("model_name", "model")
        self.model_version = artifact_config.get("model_version", "unsaved")
        self.categories = tuple(artifact_config.get("categories") or ())  # heads that tell categories apart
        self.run_id = run_id

    def __call__(self, batch: dict[str, np.ndarray]):
        n = len(batch["image_uri"])
        status = [str(v) for v in batch["status"]]
        res: dict[str, list] = {c: [None] * n for c in (*RESULT_COLUMNS, "category_scores")}
        ok = [i for i in range(n) if status[i] == S.STATUS_OK]
        hws = [(int(batch["height"][i]), int(batch["width"][i])) for i in ok]
        cats = batch[CATEGORY_SCORES_COLUMN][ok] if self.categories else None
        results = postprocess(
            self.calibration, batch["raw_score"][ok], batch["raw_map"][ok], hws, cats, self.categories
        )
        for j, (i, r) in enumerate(zip(ok, results)):
            row = (r.score, r.raw_score, r.label, S.encode_mask(r.mask), r.area, r.peak[0], r.peak[1], r.category)
            for c, v in zip(RESULT_COLUMNS, row):
                res[c][i] = v
            res["category_scores"][i] = S.category_scores_value(self.categories, None if cats is None else cats[j])
        cols = {c: [_text(v) for v in batch[c]] for c in TEXT_COLUMNS}
        for c in ("frame", "height", "width", "file_size", FRAMES_COLUMN):
            cols[c] = [None if v < 0 else int(v) for v in batch[c]]
        cols["frame"] = [0 if v is None else v for v in cols["frame"]]
        table = S.to_table(
            {**cols, **res, "status": status, "error": [_text(v) for v in batch["error"]]},
            model_name=self.model_name,
            model_version=self.model_version,
            run_id=self.run_id,
            scored_at=dt.datetime.now(dt.timezone.utc),
        )
        table = table.append_column(NODE_COLUMN, pa.array([_text(v) for v in batch[NODE_COLUMN]], pa.string()))
        table = table.append_column(TIME_COLUMN, pa.array(batch[TIME_COLUMN], pa.float64()))
        table = table.append_column(SPLITS_COLUMN, pa.array(batch[SPLITS_COLUMN], pa.int64()))
        if FRAMES_COLUMN in batch:
            table = table.append_column(FRAMES_COLUMN, pa.array(batch[FRAMES_COLUMN], pa.int64()))
        return table


# Carried from the decoder through the replicas to the output.
PASSED_COLUMNS = (
    "image_uri", "image_key", "content_sha256", "frame", "height", "width", "modality", "study_key", "file_size",
    "file_version",
)  # fmt: skip
# The Ray node a row was scored on: counted into the manifest's rows_by_node, not written to Parquet.
NODE_COLUMN = "_node_id"
# When the replica scored the row (unix seconds): the manifest's start-up vs steady-state rates.
TIME_COLUMN = "_scored_unix"
# Frames of the row's file (all of them, scored now or before): salvaging a dead run's parts.
FRAMES_COLUMN = "_file_frames"
# Model calls split in two after a device out-of-memory error (per batch, on its first row): the manifest's oom_splits.
SPLITS_COLUMN = "_oom_splits"
RESULT_COLUMNS = ("score", "raw_score", "label", "mask_png", "mask_area", "peak_row", "peak_col", "category")
# Per-category raw scores [n, C] from the replicas, for heads with categories (absent otherwise).
CATEGORY_SCORES_COLUMN = "_category_scores"


# Fault hook of the tests: "exit:PATH" or "raise:PATH"; the first replica to load creates the file
# at PATH and dies (its process exits, or its constructor raises: a CUDA library failing to load),
# the next ones load normally.
FAULT_REPLICA_DEATH_ENV = "ADCORE_FAULT_REPLICA_DEATH"


def _replica_death_hook() -> None:
    import os

    how, _, marker = os.environ.get(FAULT_REPLICA_DEATH_ENV, "").partition(":")
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    if how == "exit":
        os._exit(1)
    raise RuntimeError("replica failed while loading (fault hook)")


def _gather(pixels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The ok rows' pixels: a zero-copy view when they are contiguous (the usual case: no error rows)."""
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx):
        return pixels[idx[0] : idx[-1] + 1]
    return pixels[idx]


def _ray_connected():
    """The ``ray`` module when this process is connected to Ray, else None (never connects: asking a
    process outside Ray for its runtime context would start or join a cluster)."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def _node_id() -> str | None:
    ray = _ray_connected()
    try:
        return ray.get_runtime_context().get_node_id() if ray else None
    except Exception:  # noqa: BLE001 (a plain call outside a task)
        return None


def _ray_gpu_ids() -> list:
    ray = _ray_connected()
    try:
        return list(ray.get_gpu_ids()) if ray else []
    except Exception:  # noqa: BLE001
        return []


TEXT_COLUMNS = ("image_uri", "image_key", "content_sha256", "modality", "study_key", "file_version")


def _texts(values) -> np.ndarray:
    return np.array([_text(v) for v in values], dtype=object)


def _text(v) -> str | None:
    """Ray turns all-null string columns into float NaN arrays: back to None."""
    return v if isinstance(v, str) else None

"""The scoring job's Ray Data stages: decode+prepare (CPU tasks) and score (one actor class).

Both are plain callables on column batches, testable without Ray:

* :class:`Decoder` (stateless task): file bytes -> one row per frame with the prepared
  ``[3, S, S]`` pixels, or one error row; frames already scored are dropped (a file that
  is wholly done becomes one ``skipped`` marker row, counted for progress, never written).
* :class:`ScoreStage` (actor): network (in-process torch, onnxruntime, or Triton) +
  FAISS head + calibration/postprocessing in one place, so a batch crosses no process
  boundary between model and head. Returns a ``pyarrow.Table`` in ``schema.SCHEMA``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import warnings

import numpy as np

from adcore.data.decode import decode_image
from adcore.data.errors import DecodeError
from jobs.scoring import schema as S

log = logging.getLogger(__name__)

# Columns the decoder emits besides the pixels.
ROW_COLUMNS = ("image_uri", "content_sha256", "frame", "height", "width", "modality", "study_key",
               "status", "error")


class Decoder:
    """File bytes -> frames prepared for the network (a Ray Data batch function).

    Args:
        input_size: The network's square input size S.
        max_pixels: Files whose header announces more pixels are error rows (kind too_large),
            refused before any pixel is decoded.
        scored: ``image_uri -> FileState`` from ``ledger.scored_index`` (what to skip).
        uri_prefix: Put back in front of the paths Ray returns (``"s3://"`` for S3 input).
        secret: HMAC key of ``study_key``; None leaves it null.
    """

    def __init__(self, input_size: int, max_pixels: int, scored: dict | None = None,
                 uri_prefix: str = "", secret: bytes | None = None):
        self.input_size = input_size
        self.max_pixels = max_pixels
        self.scored = scored or {}
        self.uri_prefix = uri_prefix
        self._secret = secret

    def __repr__(self) -> str:  # Ray may print the callable: never the secret
        return f"Decoder(input_size={self.input_size}, max_pixels={self.max_pixels})"

    def _prepare(self, pixels: np.ndarray) -> np.ndarray:
        """``adcore.scorer.prepare``, minus its resize when a grayscale frame already has the input size
        (a same-size bilinear resize is the identity: only the clip and the channel copy remain)."""
        from adcore.scorer import prepare

        s = self.input_size
        if pixels.shape == (s, s):
            return np.broadcast_to(np.clip(pixels, 0, 1, dtype=np.float32), (3, s, s))
        return prepare(pixels, s)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {c: [] for c in ROW_COLUMNS}
        pixels: list[np.ndarray] = []
        blank = np.zeros((3, self.input_size, self.input_size), np.float32)  # error/skip rows

        def emit(uri, sha, frame, status, error=None, px=None, hw=(None, None), modality=None, key=None):
            for c, v in zip(ROW_COLUMNS, (uri, sha, frame, hw[0], hw[1], modality, key, status, error)):
                cols[c].append(v)
            pixels.append(blank if px is None else px)

        for data, path in zip(batch["bytes"], batch["path"]):
            uri = self.uri_prefix + str(path)
            data = bytes(data)
            sha = S.content_sha256(data)
            state = self.scored.get(uri)
            done = state.done_frames if state is not None and state.sha256 == sha else frozenset()
            if state is not None and state.sha256 == sha and state.complete:
                emit(uri, sha, 0, S.STATUS_SKIPPED)
                continue
            try:
                frames = decode_image(data, uri, max_pixels=self.max_pixels)
            except DecodeError as e:
                if 0 not in done:
                    emit(uri, sha, 0, S.STATUS_ERROR, S.format_error(e.kind, e.reason))
                else:
                    emit(uri, sha, 0, S.STATUS_SKIPPED)
                continue
            todo = [f for f in frames if f.index not in done]
            if not todo:
                emit(uri, sha, 0, S.STATUS_SKIPPED)
            for f in todo:
                key = S.study_key(f.study_uid, self._secret)
                emit(uri, sha, f.index, S.STATUS_OK, px=self._prepare(f.pixels),
                     hw=f.pixels.shape[:2], modality=f.modality, key=key)
        out = {c: np.array(v, dtype=object) for c, v in cols.items()}
        for c in ("frame", "height", "width"):
            out[c] = np.array([-1 if v is None else v for v in cols[c]], dtype=np.int64)
        out["pixels"] = np.stack(pixels) if pixels else np.zeros((0, 3, self.input_size, self.input_size), np.float32)
        return out


class ScoreStage:
    """Network + FAISS head + postprocessing on batches of prepared frames (a Ray actor).

    Args:
        artifact: Artifact URI (local or s3://).
        run_id: Written into every row.
        engine: ``"torch"`` (in-process, the default) or ``"onnx"`` (onnxruntime); ignored
            when ``triton_url`` is given.
        threads: Intra-op threads of torch / onnxruntime and FAISS's OpenMP threads.
        triton_url: ``host:port`` of a Triton server; the network then runs there.
        triton_model: Model name in Triton's repository.
        triton_protocol, triton_timeout_s, triton_retries, triton_backoff_s: Client settings.
        triton_batch: Largest batch sent in one request (<= the model's max_batch_size).
    """

    def __init__(self, artifact: str, run_id: str, engine: str = "torch", threads: int = 1,
                 triton_url: str = "", triton_model: str = "", triton_protocol: str = "http",
                 triton_timeout_s: float = 30.0, triton_retries: int = 3, triton_backoff_s: float = 0.5,
                 triton_batch: int = 16):
        import faiss
        import torch

        from adcore.scorer import load

        threads = max(1, threads)
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the actor's CPUs otherwise
        self.scorer = load(artifact)
        if self.scorer.calibration is None:
            raise ValueError(f"artifact {artifact} has no calibration; calibrate it on a validation split first")
        self.run_id = run_id
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.triton_batch = triton_batch
        self.client = None
        self.onnx = None
        self._pool = None
        if triton_url:
            from concurrent.futures import ThreadPoolExecutor

            from adcore.serving.client import TritonClient

            self.client = TritonClient(triton_url, triton_model or self.scorer.name, protocol=triton_protocol,
                                       timeout_s=triton_timeout_s, retries=triton_retries,
                                       backoff_s=triton_backoff_s)
            # One request in flight ahead: the server computes chunk k+1 while this actor runs the head on chunk k.
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triton")
        elif engine == "onnx":
            from adcore.export import OnnxNetwork, export_onnx

            path = export_onnx(self.scorer, os.path.join(tempfile.mkdtemp(prefix="adcore-onnx-"), "model.onnx"))
            self.onnx = OnnxNetwork(path, threads=threads)
        elif engine != "torch":
            raise ValueError(f"engine must be 'torch' or 'onnx', got {engine!r}")
        else:
            self.scorer.model.to(self.device)

    def network(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The network stage for one chunk (raises on failure)."""
        import torch

        from adcore.scorer import INPUT_NAME, OUTPUT_NAMES

        if self.client is not None:
            from adcore.export import from_triton

            return from_triton(self.client.infer({INPUT_NAME: pixels}))
        if self.onnx is not None:
            return self.onnx(pixels)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")  # zero-copy view of Ray's block; only read
            out = self.scorer.model(torch.from_numpy(pixels).to(self.device))
        return {k: getattr(out, k).float().cpu().numpy() for k in OUTPUT_NAMES}

    def _chunks(self, pixels: np.ndarray, ok: np.ndarray):
        """(row indices, network outputs or the exception) per chunk of ok rows, in order."""
        chunk = self.triton_batch if self.client is not None else max(1, len(ok))
        parts = [ok[i:i + chunk] for i in range(0, len(ok), chunk)]

        def gather(idx):  # a view when the rows are contiguous (the usual case: no error rows)
            if idx[-1] - idx[0] + 1 == len(idx):
                return np.ascontiguousarray(pixels[idx[0]:idx[-1] + 1], dtype=np.float32)
            return np.ascontiguousarray(pixels[idx], dtype=np.float32)

        def call(idx):
            try:
                return self.network(gather(idx))
            except Exception as e:  # noqa: BLE001 (a failed model call marks its rows, the job goes on)
                return e

        if self._pool is None:
            for idx in parts:
                yield idx, call(idx)
        else:
            futures = [self._pool.submit(call, idx) for idx in parts]
            for idx, fut in zip(parts, futures):
                yield idx, fut.result()

    def __call__(self, batch: dict[str, np.ndarray]):
        n = len(batch["image_uri"])
        status = list(batch["status"])
        error = [_text(v) for v in batch["error"]]
        res: dict[str, list] = {c: [None] * n for c in RESULT_COLUMNS}
        ok = np.flatnonzero(np.asarray(batch["status"]) == S.STATUS_OK)
        heights, widths = np.asarray(batch["height"]), np.asarray(batch["width"])
        for idx, out in self._chunks(batch["pixels"], ok):
            try:
                if isinstance(out, Exception):
                    raise out
                raw_scores, raw_maps = self.scorer.head(out)
            except Exception as e:  # noqa: BLE001 (a failed model call marks its rows, the job goes on)
                msg = S.format_error(S.INFERENCE_ERROR, f"{type(e).__name__}: {str(e)[:300]}")
                for i in idx:
                    status[i], error[i] = S.STATUS_ERROR, msg
                continue
            hws = [(int(heights[i]), int(widths[i])) for i in idx]
            for i, row in zip(idx, postprocess_batch(self.scorer.calibration, raw_scores, raw_maps, hws)):
                for c, v in zip(RESULT_COLUMNS, row):
                    res[c][i] = v
        cols = {c: [_text(v) for v in batch[c]] for c in ("image_uri", "content_sha256", "modality", "study_key")}
        for c in ("frame", "height", "width"):
            cols[c] = [None if v < 0 else int(v) for v in batch[c]]
        cols["frame"] = [0 if v is None else v for v in cols["frame"]]
        return S.to_table({**cols, **res, "status": status, "error": error},
                          model_name=self.scorer.name, model_version=self.scorer.version,
                          run_id=self.run_id, scored_at=dt.datetime.now(dt.timezone.utc))


RESULT_COLUMNS = ("score", "raw_score", "label", "mask_png", "mask_area", "peak_row", "peak_col")
# Map pixels upsampled in one call: bounds the float32 temporaries (a few of them, 4 bytes each)
# when a batch holds large frames (a 3-9 Mpx chest film).
UPSAMPLE_PIXELS = 16_000_000


def postprocess_batch(cal, raw_scores: np.ndarray, raw_maps: np.ndarray, hws: list[tuple[int, int]]):
    """``Scorer.postprocess`` over a batch, one upsample per run of same-size frames.

    Same numbers as the per-frame method (same ops, batched): yields one tuple of
    ``RESULT_COLUMNS`` values per frame, in order.
    """
    import torch
    import torch.nn.functional as F

    scores = cal.normalize_scores(np.asarray(raw_scores, dtype=np.float64))
    pixel_thr = cal.pixel_threshold if cal.pixel_threshold is not None else cal.image_threshold
    start = 0
    while start < len(hws):
        hw = hws[start]
        stop = start + 1
        while stop < len(hws) and hws[stop] == hw and (stop - start + 1) * hw[0] * hw[1] <= UPSAMPLE_PIXELS:
            stop += 1
        t = torch.from_numpy(np.ascontiguousarray(raw_maps[start:stop], dtype=np.float32))[:, None]  # [k, 1, g, g]
        amap = F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[:, 0].numpy()  # [k, H, W]
        nmap = cal.normalize_maps(amap).astype(np.float32, copy=False)
        masks = nmap >= pixel_thr
        peaks = np.unravel_index(nmap.reshape(stop - start, -1).argmax(1), hw)
        areas = masks.reshape(stop - start, -1).sum(1)
        for j in range(stop - start):
            s = float(scores[start + j])
            yield (s, float(raw_scores[start + j]), int(s >= cal.image_threshold), S.encode_mask(masks[j]),
                   int(areas[j]), int(peaks[0][j]), int(peaks[1][j]))
        start = stop


def _text(v) -> str | None:
    """Ray turns all-null string columns into float NaN arrays: back to None."""
    return v if isinstance(v, str) else None

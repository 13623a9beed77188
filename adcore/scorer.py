"""The one inference path: prepare -> network -> head -> batched postprocess.

Every caller (the nightly stage, evaluation, training-time validation, the demo)
scores through a :class:`Scorer`, rebuilt from one artifact directory:

    pixels  = prepare(image, scorer.input_size)   # [3, S, S] float32 in [0, 1] (decode workers ship
                                                  # prepare_plane's [1, S, S] for a grey frame)
    net     = scorer.forward(batch)               # the network backend: torch, onnxruntime or Triton
    raw     = scorer.raw(batch)                   # + the family's FAISS head: raw scores [B], maps [B, g, g]
    results = scorer.postprocess(scores, maps, hws)  # calibrated score, label, map, mask, area, peak

The network backend is one small interface (:class:`Network`): a callable from
pixels to the named outputs, with the largest batch it takes. A head that tells anomaly
categories apart (e.g. SD-MAD's) also declares ``categories`` (names) and
``category_scores(out) -> [B, C]``; results then carry per-category scores and the most
likely category of each anomalous frame (:func:`head_categories`; other heads: none, as before). Scores are
normalised and thresholded with the calibration stored in the artifact (fit on
validation data at training time), so one image can be scored alone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

import adcore
from adcore.artifact import load_artifact, save_artifact
from adcore.calibration import Calibration
from adcore.models import AnomalyModel, family_of_config, from_config

# Network outputs crossing the model/FAISS boundary (ONNX and Triton use the same names).
OUTPUT_NAMES = ("score", "anomaly_map", "patch_embeddings")
INPUT_NAME = "pixel_values"
# Map pixels upsampled in one call: bounds the float32 temporaries (a few of them, 4 bytes each)
# when a batch holds large frames (a 3-9 Mpx chest film).
UPSAMPLE_PIXELS = 16_000_000
# Fault hook of the tests (a CUDA out-of-memory error cannot be caused on a CPU): when set to N,
# the in-process torch network raises torch.OutOfMemoryError for any batch larger than N.
FAULT_OOM_ABOVE_ENV = "ADCORE_FAULT_OOM_ABOVE"


def prepare(image: np.ndarray, size: int) -> np.ndarray:
    """HxW or HxWxC image in [0, 1] (or uint8) -> [3, size, size] float32 in [0, 1].

    The whole image is resized (no centre crop, unlike the paper's CenterCrop):
    the map must cover every pixel of the original image. A grey frame is resized once, as one
    plane (:func:`prepare_plane`), and its three channels are views of it.
    """
    x = prepare_plane(image, size)
    x = as_float(x) if x.dtype == np.uint8 else x  # a uint8 image's values / 255
    return np.broadcast_to(x, (3, size, size)) if x.shape[0] == 1 else x


def prepare_plane(image: np.ndarray, size: int) -> np.ndarray:
    """HxW or HxWxC image -> [C, size, size] with C = 1 for a grey image, 3 for a colour one.

    Resized once at the image's own dtype: float pixels in [0, 1] stay float32 (no copy when they
    are float32 already), uint8 pixels are resized as uint8 (``value / 255`` is what they mean).
    The network gets the grey plane broadcast to three channels (:func:`three_channels`, or on the
    device); resizing one plane instead of three identical ones gives the same values.
    """
    x = np.asarray(image)
    if x.dtype != np.uint8:
        x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.ndim == 3 and x.shape[2] == 4:
        x = x[..., :3]
    if x.ndim == 2:
        x = x[None]  # [1, H, W]
    elif x.ndim == 3 and x.shape[2] == 3:
        x = x.transpose(2, 0, 1)  # [3, H, W]
    else:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {np.shape(image)}")
    if x.shape[1:] == (size, size):  # a same-size bilinear resize is the identity
        return x if x.dtype == np.uint8 else np.clip(x, 0, 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")  # a read-only decoded frame
        t = torch.from_numpy(np.ascontiguousarray(x))[None]  # [1, C, H, W]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t[0].numpy() if x.dtype == np.uint8 else t[0].clamp_(0, 1).numpy()


def three_channels(pixels: np.ndarray) -> np.ndarray:
    """Prepared frames [B, 1 or 3, S, S] -> [B, 3, S, S] (a broadcast view of a grey plane), or a
    ragged batch (an object array of [C, S, S] frames, as Ray hands over blocks of both kinds) stacked."""
    if pixels.dtype == object:
        return np.stack([np.broadcast_to(p, (3, *np.shape(p)[1:])) for p in pixels])
    if pixels.ndim == 4 and pixels.shape[1] == 1:
        return np.broadcast_to(pixels, (pixels.shape[0], 3, *pixels.shape[2:]))
    return pixels


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Prepared pixels in [0, 1] -> uint8 (4x smaller in transit; the network sees ``value / 255``);
    uint8 pixels (:func:`prepare_plane` of a uint8 image) unchanged."""
    if np.asarray(pixels).dtype == np.uint8:
        return np.asarray(pixels)
    return np.rint(np.asarray(pixels, dtype=np.float32) * 255.0).astype(np.uint8)


def as_float(pixels: np.ndarray) -> np.ndarray:
    """Network input as float32 in [0, 1], from float pixels or from :func:`to_uint8`'s."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) * np.float32(1 / 255)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def as_uint8(pixels: np.ndarray) -> np.ndarray:
    """Network input as uint8 (for graphs that take the decoder's frames as they are): uint8 unchanged,
    float pixels in [0, 1] through :func:`to_uint8`."""
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    return to_uint8(pixels)


def upsample_maps(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Patch-grid maps [k, g, g] -> [k, H, W] by bilinear interpolation."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]  # [k, 1, g, g]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[:, 0].numpy()


class Network(Protocol):
    """A network backend: [B, 3, S, S] float32 pixels -> ``OUTPUT_NAMES`` arrays.

    ``max_batch`` is the largest batch one call takes (None: any); ``in_flight`` is how many
    calls may run ahead of the head (0: none; a remote server computes the next chunk while
    this process runs the head on the current one). A backend with ``input_dtype = "uint8"``
    (the exported graphs) gets uint8 pixels instead (:func:`as_uint8`).
    """

    max_batch: int | None
    in_flight: int

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]: ...


class TorchNetwork:
    """The model in-process, on the device its weights are on.

    Takes the decoder's frames as they come (``input_dtype = "native"``): uint8 or float, one grey
    plane or three channels. On a CUDA device uint8 frames cross in pinned memory and are converted
    (``/ 255``) and broadcast to three channels there; with ``autocast`` (a dtype name, e.g.
    ``"bfloat16"``: the family allows it, see ``MethodFamily.autocast``) the network runs under it.
    On the CPU the same steps run on the CPU, in float32.
    """

    max_batch = None
    in_flight = 0
    input_dtype = "native"

    def __init__(self, model: AnomalyModel, autocast: str | None = None):
        self.model = model.eval()
        self.autocast = autocast
        self.oom_above = int(os.environ.get(FAULT_OOM_ABOVE_ENV) or 0)  # tests only: 0 = off

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray, device_outputs: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """``device_outputs``: outputs left as tensors on a CUDA device (a head searching them there)."""
        if self.oom_above and len(pixels) > self.oom_above:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fault hook: batch {len(pixels)} > {self.oom_above})")
        device = next(self.model.parameters()).device
        x = to_device(pixels, device)  # [B, 3, S, S] float32 in [0, 1]
        cast = self.autocast if device.type == "cuda" else None  # CPU autocast is slower than fp32
        with torch.autocast(device.type, dtype=getattr(torch, cast)) if cast else contextlib.nullcontext():
            out = self.model(x)
        keep = device_outputs if device.type == "cuda" else ()
        outs = {k: getattr(out, k).float() for k in OUTPUT_NAMES}
        return {k: v if k in keep else v.cpu().numpy() for k, v in outs.items()}


def to_device(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """Prepared frames (uint8 or float, [B, 1 or 3, S, S] or ragged) -> [B, 3, S, S] float32 in [0, 1] on ``device``.

    uint8 frames cross as uint8 (4x fewer bytes; from pinned memory to a GPU, without waiting) and
    become floats on the device, where a grey plane is also broadcast to three channels.
    """
    if pixels.dtype == object:
        pixels = three_channels(pixels)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")  # a read-only view (e.g. Ray's block)
        t = torch.from_numpy(np.ascontiguousarray(pixels))
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    if t.dtype == torch.uint8:
        t = t.to(torch.float32).mul_(float(np.float32(1 / 255)))  # as_float's values
    else:
        t = t.to(torch.float32)
    return t.expand(-1, 3, -1, -1).contiguous() if t.shape[1] == 1 else t


def head_categories(head) -> tuple[str, ...]:
    """The anomaly categories a head tells apart (its ``categories``); empty for a plain anomaly head."""
    return tuple(str(c) for c in (getattr(head, "categories", None) or ()))


def most_likely_category(categories: tuple[str, ...], scores: np.ndarray | None, label: int | None) -> str | None:
    """The category with the highest score for a frame labelled anomalous; None for normal frames,
    frames without a calibrated label, and heads without categories."""
    if not categories or scores is None or label != 1:
        return None
    return categories[int(np.argmax(scores))]


class NetworkOnlyHead:
    """The network's own score and map as the raw values (training-time validation, before any head is fit)."""

    def __call__(self, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(out["score"], np.float32), np.asarray(out["anomaly_map"], np.float32)


@dataclass
class ImageResult:
    """One frame's result. Calibrated fields are None when the scorer has no calibration yet."""

    raw_score: float
    raw_map: np.ndarray  # [H, W] raw, at the image's size (threshold-free metrics use it)
    peak: tuple[int, int]  # (row, col) of the map's maximum
    score: float | None = None  # calibrated, in [0, 1]
    label: int | None = None  # 1 = anomalous at the artifact's image threshold
    anomaly_map: np.ndarray | None = None  # [H, W] calibrated, in [0, 1]
    mask: np.ndarray | None = None  # [H, W] bool at the artifact's pixel threshold
    area: int | None = None  # pixels in the mask
    category_scores: dict[str, float] | None = None  # per-category scores (heads with categories only)
    category: str | None = None  # the most likely category when label is 1, else None


def postprocess(
    calibration: Calibration | None,
    raw_scores: np.ndarray,
    raw_maps: np.ndarray,
    hws: list[tuple[int, int]],
    category_scores: np.ndarray | None = None,
    categories: tuple[str, ...] = (),
) -> Iterator[ImageResult]:
    """Raw values -> one :class:`ImageResult` per frame, each map at its frame's size ``hws[i]``.

    Upsamples once per run of same-size frames (bounded by ``UPSAMPLE_PIXELS``). A generator:
    a caller that drops each result as it goes holds one run's maps at a time. With
    ``categories`` and their ``category_scores`` [N, C], each result also carries them and the
    most likely category of a frame labelled anomalous.
    """
    categories = tuple(categories)
    if categories and (category_scores is None or np.shape(category_scores) != (len(hws), len(categories))):
        raise ValueError(f"category_scores must be [{len(hws)}, {len(categories)}], got {np.shape(category_scores)}")
    cal = calibration
    raw_scores = np.asarray(raw_scores, dtype=np.float32)
    scores = cal.normalize_scores(raw_scores.astype(np.float64)) if cal else None
    start = 0
    while start < len(hws):
        hw = tuple(int(v) for v in hws[start])
        stop = start + 1
        while stop < len(hws) and tuple(hws[stop]) == hw and (stop - start + 1) * hw[0] * hw[1] <= UPSAMPLE_PIXELS:
            stop += 1
        amap = upsample_maps(raw_maps[start:stop], hw)  # [k, H, W]
        peaks = np.unravel_index(amap.reshape(stop - start, -1).argmax(1), hw)
        if cal is not None:
            nmap = cal.normalize_maps(amap).astype(np.float32, copy=False)
            masks = nmap >= cal.effective_pixel_threshold
            areas = masks.reshape(stop - start, -1).sum(1)
        for j in range(stop - start):
            i = start + j
            result = ImageResult(float(raw_scores[i]), amap[j], (int(peaks[0][j]), int(peaks[1][j])))
            if cal is not None:
                result.score = float(scores[i])
                result.label = int(scores[i] >= cal.image_threshold)
                result.anomaly_map, result.mask, result.area = nmap[j], masks[j], int(areas[j])
            if categories:
                row = np.asarray(category_scores[i], np.float32)
                result.category_scores = {c: float(v) for c, v in zip(categories, row)}
                result.category = most_likely_category(categories, row, result.label)
            yield result
        start = stop


class Scorer:
    """Everything needed to score an image, rebuilt from an artifact alone."""

    def __init__(
        self,
        model: AnomalyModel,
        head,
        calibration: Calibration | None = None,
        meta: dict[str, Any] | None = None,
        network: Network | None = None,
    ):
        self.model = model.eval()
        self.head = head
        self.calibration = calibration
        self.meta = dict(meta or {})
        self.network: Network = network or TorchNetwork(self.model)
        self.oom_splits = 0  # network calls split in two after an out-of-memory error (callers read and reset it)
        self.fitting_batch: int | None = None  # largest batch known to fit after a split: later calls stay within it

    def use_autocast(self) -> None:
        """The in-process torch network runs under its family's autocast dtype on CUDA (if it declares one)."""
        if isinstance(self.network, TorchNetwork) and hasattr(self, "artifact_config"):
            self.network.autocast = family_of_config(self.artifact_config["model"]).autocast

    @property
    def input_size(self) -> int:
        return self.model.input_size

    @property
    def categories(self) -> tuple[str, ...]:
        """The head's anomaly categories (empty for a plain anomaly head)."""
        return head_categories(self.head)

    @property
    def name(self) -> str:
        return self.meta.get("model_name", getattr(self.model, "preset_name", "model"))

    @property
    def version(self) -> str:
        return self.meta.get("model_version", "unsaved")

    def device_outputs(self) -> tuple[str, ...]:
        """Network outputs the head takes as tensors on the network's device: its index is on that GPU
        (``device_embeddings``) and the network runs in-process, so embeddings never visit the host."""
        if isinstance(self.network, TorchNetwork) and getattr(self.head, "device_embeddings", False):
            return ("patch_embeddings",)
        return ()

    def forward(self, pixels: np.ndarray, device_outputs: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """The network stage: [B, 3 or 1, S, S] (float in [0, 1] or uint8; 1: a grey plane) -> score,
        anomaly_map, patch_embeddings (one backend call)."""
        # Every backend sees the same network input: the frame rounded to uint8 (what the scoring job
        # ships, what the exported graphs take), then value / 255; float pixels are rounded here.
        pixels = as_uint8(pixels) if pixels.dtype != object else pixels
        kind = getattr(self.network, "input_dtype", "float32")
        if kind == "native":  # the backend converts (on its device)
            return self.network(pixels, device_outputs) if device_outputs else self.network(pixels)
        pixels = three_channels(pixels)
        return self.network(as_uint8(pixels) if kind == "uint8" else as_float(pixels))

    def iter_raw(
        self, pixels: np.ndarray, with_categories: bool = False
    ) -> Iterator[tuple[slice, tuple[np.ndarray, ...] | Exception]]:
        """Network + head per chunk of at most ``network.max_batch`` rows, in order.

        Yields ``(rows, (raw scores, raw maps))``, or ``(rows, exception)`` for a chunk whose
        network or head call failed, so a caller can mark just those rows. With a network that
        allows calls in flight, the next chunks' network calls run while the head matches this one.
        ``with_categories`` adds a third value: the per-category scores [b, C] (None for a head
        without categories).
        """
        categories = self.categories
        n = len(pixels)
        step = min(self.network.max_batch or max(1, n), self.fitting_batch or n or 1)
        chunks = [slice(i, min(i + step, n)) for i in range(0, n, step)]

        keep = self.device_outputs()

        def network(rows: slice):
            try:
                return self._forward_fitting(pixels[rows], keep)
            except Exception as e:  # noqa: BLE001 (the caller decides what a failed chunk means)
                return e

        def head(out):
            if isinstance(out, Exception):
                return out
            try:
                scores, maps = self.head(out)
                if not with_categories:
                    return scores, maps
                return scores, maps, (self.head.category_scores(out) if categories else None)
            except Exception as e:  # noqa: BLE001
                return e

        if self.network.in_flight <= 0 or len(chunks) == 1:
            for rows in chunks:
                yield rows, head(network(rows))
            return
        with ThreadPoolExecutor(max_workers=self.network.in_flight, thread_name_prefix="network") as pool:
            futures = [pool.submit(network, rows) for rows in chunks]
            for rows, fut in zip(chunks, futures):
                yield rows, head(fut.result())

    def _forward_fitting(self, pixels: np.ndarray, device_outputs: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """:meth:`forward`, split in halves (recursively) while the device runs out of memory.

        Only a single frame that does not fit raises; each split is counted in ``oom_splits``
        and the largest half that fitted bounds later calls (``fitting_batch``).
        """
        try:
            return self.forward(pixels, device_outputs)
        except Exception as e:
            if not is_out_of_memory(e) or len(pixels) <= 1:
                raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the failed call's blocks, before the smaller ones
        half = (len(pixels) + 1) // 2
        self.oom_splits += 1
        parts = [self._forward_fitting(part, device_outputs) for part in (pixels[:half], pixels[half:])]
        self.fitting_batch = min(self.fitting_batch or half, half)
        join = {k: torch.cat if torch.is_tensor(parts[0][k]) else np.concatenate for k in parts[0]}
        return {k: join[k]([p[k] for p in parts]) for k in parts[0]}

    def raw(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Network + head: raw scores [B] and raw maps [B, g, g] (raises on failure)."""
        scores, maps = [], []
        for _, out in self.iter_raw(pixels):
            if isinstance(out, Exception):
                raise out
            scores.append(out[0])
            maps.append(out[1])
        return np.concatenate(scores), np.concatenate(maps)

    def raw_with_categories(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`raw` plus the per-category scores [B, C] (None for a head without categories)."""
        parts = []
        for _, out in self.iter_raw(pixels, with_categories=True):
            if isinstance(out, Exception):
                raise out
            parts.append(out)
        cats = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), cats

    def postprocess(
        self,
        raw_scores: np.ndarray,
        raw_maps: np.ndarray,
        hws: list[tuple[int, int]],
        category_scores: np.ndarray | None = None,
    ) -> Iterator[ImageResult]:
        """Raw values -> one :class:`ImageResult` per frame (see :func:`postprocess`)."""
        cats = self.categories if category_scores is not None else ()
        return postprocess(self.calibration, raw_scores, raw_maps, hws, category_scores, cats)

    def score_images(self, images: list[np.ndarray], batch_size: int = 8) -> list[ImageResult]:
        """Score decoded images (HxW or HxWxC in [0, 1]); each map comes back at its image's size."""
        results: list[ImageResult] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            scores, maps, cats = self.raw_with_categories(np.stack([prepare(im, self.input_size) for im in chunk]))
            results += self.postprocess(scores, maps, [im.shape[:2] for im in chunk], cats)
        return results

    # --- artifact I/O -------------------------------------------------------
    def save(self, uri: str, *, model_name: str | None = None, version: int = 1, extra: dict | None = None) -> str:
        """Write the artifact (config, weights, head arrays, calibration, manifest)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        arrays = self.head.arrays()
        fingerprint = _fingerprint(state, arrays)
        name = model_name or self.name
        self.meta.update(
            model_name=name,
            version=int(version),
            model_version=f"{name}-v{int(version)}-{fingerprint[:12]}",
            fingerprint=fingerprint,
        )
        config = {
            "format": "adcore-model/1",
            "adcore_version": adcore.__version__,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **self.meta,
            "input_size": self.input_size,
            "grid": self.model.grid,
            "embedding_dim": self.model.embedding_dim,
            "io": {"input": INPUT_NAME, "outputs": list(OUTPUT_NAMES)},
            "model": self.model.config_dict(),
            "head": self.head.config(),
            "calibration": self.calibration.to_dict() if self.calibration else None,
            **({"categories": list(self.categories)} if self.categories else {}),
            **({"training": extra} if extra else {}),
        }
        return save_artifact(uri, config, state, arrays)

    @classmethod
    def load(cls, uri: str, use_gpu: bool | None = None) -> Scorer:
        """Rebuild from an artifact; network and FAISS index go to the GPU when one is present
        (``use_gpu=None``), or as ``use_gpu`` says."""
        art = load_artifact(uri)
        cfg = art.config
        model = from_config(cfg["model"])
        missing, unexpected = model.load_state_dict(art.state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"artifact {uri}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
        model.to("cuda" if gpu else "cpu")
        head = family_of_config(cfg["model"]).head_class.from_saved(cfg["head"], art.arrays, use_gpu=use_gpu)
        cal = Calibration.from_dict(cfg["calibration"]) if cfg.get("calibration") else None
        keys = ("model_name", "version", "model_version", "fingerprint", "created_at")
        scorer = cls(model, head, cal, {k: cfg[k] for k in keys if k in cfg})
        scorer.artifact_path = art.path
        scorer.artifact_config = cfg
        return scorer


def is_out_of_memory(e: BaseException) -> bool:
    """A device out-of-memory error (torch's, or onnxruntime's failed allocation)."""
    return isinstance(e, torch.OutOfMemoryError) or "Failed to allocate memory" in str(e)


def _fingerprint(state: dict[str, torch.Tensor], arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].cpu().numpy().tobytes())
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def load(uri: str, use_gpu: bool | None = None) -> Scorer:
    """Rebuild a scorer from an artifact directory (local path or ``s3://`` prefix)."""
    return Scorer.load(uri, use_gpu=use_gpu)

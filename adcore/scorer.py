"""A scorer: network + FAISS head + calibration, loadable from one artifact directory.

The pipeline's stages map onto methods so that the nightly job can run each
stage where it belongs (decode on CPU workers, the network in-process or in
Triton, the head on FAISS):

    pixels = prepare(image)                      # [3, S, S] float32 in [0, 1]
    net    = scorer.forward(batch)               # dict of numpy arrays (or Triton's outputs)
    raw    = scorer.head(net)                    # raw score [B], raw map [B, g, g]
    result = scorer.postprocess(score, map, hw)  # normalised score, label, mask at the image's size

Scores are normalised and thresholded with the calibration stored in the
artifact (fit on validation data at training time), so one image can be
scored alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import adcore
from adcore.artifact import load_artifact, save_artifact
from adcore.calibration import Calibration
from adcore.heads import head_from_config
from adcore.models import AnomalyModel, from_config

# Network outputs crossing the model/FAISS boundary (ONNX and Triton use the same names).
OUTPUT_NAMES = ("score", "anomaly_map", "patch_embeddings")
INPUT_NAME = "pixel_values"


def prepare(image: np.ndarray, size: int) -> np.ndarray:
    """HxW or HxWxC image in [0, 1] -> [3, size, size] float32.

    The whole image is resized (no centre crop, unlike the paper's CenterCrop):
    the map must cover every pixel of the original image.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {x.shape}")
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    elif x.shape[2] == 4:
        x = x[..., :3]
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]  # [1, 3, H, W]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t[0].clamp_(0, 1).numpy()


def upsample_map(amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Patch-grid map [g, g] -> [H, W] by bilinear interpolation."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()


@dataclass
class ImageResult:
    score: float  # calibrated, in [0, 1]
    raw_score: float
    label: int  # 1 = anomalous at the artifact's image threshold
    anomaly_map: np.ndarray  # [H, W] calibrated, in [0, 1]
    mask: np.ndarray  # [H, W] bool at the artifact's pixel threshold
    peak: tuple[int, int]  # (row, col) of the map's maximum


class Scorer:
    """Everything needed to score an image, rebuilt from an artifact alone."""

    def __init__(
        self,
        model: AnomalyModel,
        head,
        calibration: Calibration | None = None,
        meta: dict[str, Any] | None = None,
    ):
        self.model = model.eval()
        # The network runs where its weights are: load() puts them on the GPU when there is one.
        self.device = next(model.parameters()).device
        self.head = head
        self.calibration = calibration
        self.meta = dict(meta or {})

    @property
    def input_size(self) -> int:
        return self.model.input_size

    @property
    def name(self) -> str:
        return self.meta.get("model_name", getattr(self.model, "preset_name", "model"))

    @property
    def version(self) -> str:
        return self.meta.get("model_version", "unsaved")

    @torch.inference_mode()
    def forward(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The network stage: [B, 3, S, S] -> score, anomaly_map, patch_embeddings."""
        out = self.model(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device))
        return {k: getattr(out, k).float().cpu().numpy() for k in OUTPUT_NAMES}

    def raw(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Network + head: raw scores [B] and raw maps [B, g, g]."""
        return self.head(self.forward(pixels))

    def postprocess(self, raw_score: float, raw_map: np.ndarray, hw: tuple[int, int]) -> ImageResult:
        cal = self.calibration
        amap = upsample_map(raw_map, hw)
        if cal is None:
            raise ValueError("this scorer has no calibration; calibrate on a validation split first")
        score = float(cal.normalize_scores(np.array([raw_score]))[0])
        nmap = cal.normalize_maps(amap).astype(np.float32)
        pixel_thr = cal.pixel_threshold if cal.pixel_threshold is not None else cal.image_threshold
        mask = nmap >= pixel_thr
        peak = np.unravel_index(int(np.argmax(nmap)), nmap.shape)
        return ImageResult(
            score=score,
            raw_score=float(raw_score),
            label=int(score >= cal.image_threshold),
            anomaly_map=nmap,
            mask=mask,
            peak=(int(peak[0]), int(peak[1])),
        )

    def score_images(self, images: list[np.ndarray], batch_size: int = 8) -> list[ImageResult]:
        """Score decoded images (HxW or HxWxC in [0, 1]); each map comes back at its image's size."""
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = np.stack([prepare(im, self.input_size) for im in chunk])
            scores, maps = self.raw(pixels)
            results += [self.postprocess(s, m, im.shape[:2]) for s, m, im in zip(scores, maps, chunk)]
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
            **({"training": extra} if extra else {}),
        }
        return save_artifact(uri, config, state, arrays)

    @classmethod
    def load(cls, uri: str, use_gpu: bool | None = None) -> "Scorer":
        """Rebuild from an artifact; network and FAISS index go to the GPU when one is present
        (``use_gpu=None``), or as ``use_gpu`` says."""
        art = load_artifact(uri)
        cfg = art.config
        model = from_config(cfg["model"])
        missing, unexpected = model.load_state_dict(art.state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f"artifact {uri}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
        model.to("cuda" if gpu else "cpu")
        head = head_from_config(cfg["head"], art.arrays, use_gpu=use_gpu)
        cal = Calibration.from_dict(cfg["calibration"]) if cfg.get("calibration") else None
        keys = ("model_name", "version", "model_version", "fingerprint", "created_at")
        meta = {k: cfg[k] for k in keys if k in cfg}
        scorer = cls(model, head, cal, meta)
        scorer.artifact_path = art.path
        scorer.artifact_config = cfg
        return scorer


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


"""Score normalisation and decision thresholds fitted on a validation split.

Calibration is fitted once, from validation data only (never the test set), and
saved with the model. At inference every image is normalised on its own with the
stored constants: a nightly job scores one image at a time, so nothing may depend
on the batch it arrives in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from adcore.metrics import f1_max, stratified_subsample

# Upper end of the normalisation range: this percentile of all validation scores,
# so one extreme outlier does not squeeze every other score towards 0.
HI_PERCENTILE = 99.0
# Threshold when the validation split has no anomalies: this quantile of normal scores
# (about 1% of normal images flagged).
NORMAL_QUANTILE = 0.99
# Pixels used to fit the pixel calibration are subsampled to this many (memory bound).
MAX_PIXELS = 2_000_000


@dataclass
class Calibration:
    """Normalisation constants and thresholds, in normalised units ([0, 1]).

    Attributes:
        score_lo: raw image score mapped to 0 (median of normal validation scores).
        score_hi: raw image score mapped to 1 (99th percentile of all validation scores).
        image_threshold: max-F1 threshold on validation (or the normal quantile).
        sensitivity_threshold: highest threshold that still flags ``target_sensitivity``
            of validation anomalies; equals ``image_threshold`` without anomalies.
        target_sensitivity: the recall that ``sensitivity_threshold`` aims for.
        pixel_lo, pixel_hi, pixel_threshold: the same for anomaly maps; None if no
            maps were given.
        method: how thresholds were chosen ("valid-max-f1" or "normal-quantile-0.99").
        n_valid: number of validation images.
    """

    score_lo: float
    score_hi: float
    image_threshold: float
    sensitivity_threshold: float
    target_sensitivity: float = 0.95
    pixel_lo: float | None = None
    pixel_hi: float | None = None
    pixel_threshold: float | None = None
    method: str = "valid-max-f1"
    n_valid: int = 0

    def normalize_scores(self, raw) -> np.ndarray:
        """Raw image scores to [0, 1] (clipped), in float64 like the fitted thresholds."""
        return _normalize(np.asarray(raw, dtype=np.float64), self.score_lo, self.score_hi)

    def normalize_maps(self, raw) -> np.ndarray:
        """Raw anomaly maps to [0, 1] (clipped), with the pixel constants; float32 stays float32."""
        if self.pixel_lo is None or self.pixel_hi is None:
            raise ValueError("this calibration has no pixel constants: fit it with maps")
        x = np.asarray(raw)
        return _normalize(x.astype(np.result_type(x, np.float32)), self.pixel_lo, self.pixel_hi)

    @property
    def effective_pixel_threshold(self) -> float:
        """The pixel threshold masks are cut at; the image threshold where none was fitted."""
        return self.pixel_threshold if self.pixel_threshold is not None else self.image_threshold

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown Calibration fields: {sorted(unknown)}")
        return cls(**data)


def _normalize(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((x - x.dtype.type(lo)) / x.dtype.type(hi - lo), 0.0, 1.0)


def _range(lo: float, hi: float, raw_thresholds: list[float], all_scores: np.ndarray):
    """Widen [lo, hi] to hold every raw threshold, so ``norm >= norm_thr`` iff ``raw >= thr``.

    A degenerate range (constant scores) falls back to the maximum, then to a unit span.
    """
    lo = min([lo, *raw_thresholds])
    hi = max([hi, *raw_thresholds])
    if hi <= lo:
        hi = float(all_scores.max())
    if hi <= lo:
        hi = lo + 1.0  # constant scores: normalisation is only a shift
    return float(lo), float(hi)


def _to_unit(x: float, lo: float, hi: float) -> float:
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def _sensitivity_raw(anomaly_scores: np.ndarray, target: float) -> float:
    """Highest raw threshold whose recall on these anomaly scores reaches ``target``."""
    k = max(1, math.ceil(target * anomaly_scores.size))  # anomalies that must be flagged
    return float(np.sort(anomaly_scores)[::-1][k - 1])


def fit_calibration(
    labels,
    scores,
    masks=None,
    maps=None,
    target_sensitivity: float = 0.95,
) -> Calibration:
    """Fit normalisation and thresholds on the validation split (never on the test set).

    Args:
        labels: 0 = normal, 1 = anomalous, one per validation image.
        scores: raw image scores.
        masks: optional ground-truth masks (HxW, nonzero = anomalous); entries may be
            None for normal images.
        maps: optional raw anomaly maps (HxW) for the pixel calibration.
        target_sensitivity: recall on anomalies for ``sensitivity_threshold``.

    With anomalies, thresholds are the max-F1 threshold and the sensitivity operating
    point. Without anomalies both are the 0.99 quantile of normal scores. Raw
    thresholds always fall inside [lo, hi], so comparing normalised values decides
    exactly as comparing raw ones.
    """
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size == 0 or y.shape != s.shape:
        raise ValueError(f"need as many labels as scores (>0), got {y.size} and {s.size}")
    if not np.isfinite(s).all():
        raise ValueError("validation scores contain NaN or infinite values")
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")

    normal = s[~y]
    lo = float(np.median(normal)) if normal.size else float(s.min())
    hi = float(np.percentile(s, HI_PERCENTILE))
    if y.any():
        method = "valid-max-f1"
        thr = f1_max(y, s)[1]
        sens = _sensitivity_raw(s[y], target_sensitivity)
    else:
        method = f"normal-quantile-{NORMAL_QUANTILE}"
        thr = sens = float(np.quantile(normal, NORMAL_QUANTILE))
    lo, hi = _range(lo, hi, [thr, sens], s)
    calib = Calibration(
        score_lo=lo,
        score_hi=hi,
        image_threshold=_to_unit(thr, lo, hi),
        sensitivity_threshold=_to_unit(sens, lo, hi),
        target_sensitivity=target_sensitivity,
        method=method,
        n_valid=int(y.size),
    )
    if maps is not None:
        calib.pixel_lo, calib.pixel_hi, calib.pixel_threshold = _fit_pixels(y, masks, maps)
    return calib


def _fit_pixels(y: np.ndarray, masks, maps) -> tuple[float, float, float]:
    """Pixel lo, hi and threshold, fitted like the image ones (max-F1 on anomalous images)."""
    maps = [np.asarray(a, dtype=np.float32) for a in maps]
    if len(maps) != y.size:
        raise ValueError(f"{len(maps)} maps for {y.size} validation images")
    if masks is None:
        masks = [None] * len(maps)
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks for {len(maps)} maps")
    gts = []
    for i, (m, a) in enumerate(zip(masks, maps)):
        gt = np.zeros(a.shape, bool) if m is None else np.asarray(m) > 0
        if gt.shape != a.shape:
            raise ValueError(f"mask {i} has shape {gt.shape} but map {i} has shape {a.shape}")
        gts.append(gt)

    # Pixels whose label is known: every pixel of normal images, and of anomalous images
    # only when a mask was given.
    known = [i for i in range(len(maps)) if not y[i] or masks[i] is not None]
    if not known:
        known = list(range(len(maps)))
    px = np.concatenate([maps[i].ravel() for i in known])
    px_gt = np.concatenate([gts[i].ravel() for i in known])
    keep = stratified_subsample(px_gt, MAX_PIXELS)
    if keep is not None:
        px, px_gt = px[keep], px_gt[keep]
    if not np.isfinite(px).all():
        raise ValueError("validation maps contain NaN or infinite values")
    normal_px = px[~px_gt] if (~px_gt).any() else px
    lo = float(np.median(normal_px))
    hi = float(np.percentile(px, HI_PERCENTILE))

    anomalous = [i for i in known if y[i] and gts[i].any()]
    if anomalous:
        a_px = np.concatenate([maps[i].ravel() for i in anomalous])
        a_gt = np.concatenate([gts[i].ravel() for i in anomalous])
        keep = stratified_subsample(a_gt, MAX_PIXELS)
        if keep is not None:
            a_px, a_gt = a_px[keep], a_gt[keep]
        thr = f1_max(a_gt, a_px)[1]
    else:
        thr = float(np.quantile(normal_px, NORMAL_QUANTILE))
    lo, hi = _range(lo, hi, [thr], px)
    return lo, hi, _to_unit(thr, lo, hi)

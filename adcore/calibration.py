"""Score normalisation and decision thresholds fitted on a validation split.

Calibration is fitted once, from validation data only (never the test set), and
saved with the model. At inference every image is normalised on its own with the
stored constants: a nightly job scores one image at a time, so nothing may depend
on the batch it arrives in.

The calibrated image score (format 2) is the share of normal validation images
that score lower (ties count half), linear between those scores, with a tail
beyond the lowest and the highest that approaches 0 and 1 without reaching them.
It is strictly increasing in the raw score, so it ranks like the raw score.
Format 1 (artifacts written before it) clipped a linear map to [0, 1]; such
calibrations still load and normalise exactly as they did.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np

from adcore.metrics import f1_max, stratified_subsample

log = logging.getLogger("adcore.calibration")

# Calibration formats: 1 = image scores clipped linearly between score_lo and score_hi
# (artifacts written before the score map existed); 2 = the strictly increasing ScoreMap.
CLIPPED_VERSION = 1
SCORE_MAP_VERSION = 2
# Knots kept in the score map: bounds config.json (two lists of floats) whatever the split size,
# while 256 quantiles keep the map within 1/255 (plus one tied value's share) of the empirical CDF.
MAX_KNOTS = 256
# Tail scale: the spread of the highest (lowest) tenth of normal scores, a local width that one
# extreme score barely moves.
TAIL_SHARE = 0.1
# Upper end of the (pixel, and format-1 image) normalisation range: this percentile of all
# validation scores, so one extreme outlier does not squeeze every other score towards 0.
HI_PERCENTILE = 99.0
# Threshold when the validation split has no anomalies (the common case in hospitals): the score
# that this share of normal validation images stays below (1% of normal images flagged).
DEFAULT_SPECIFICITY = 0.99
# Below this many validation anomalies the max-F1 threshold rests on a handful of images: said in the log.
MIN_STABLE_ANOMALIES = 20
# Pixels used to fit the pixel calibration are subsampled to this many (memory bound).
MAX_PIXELS = 2_000_000


@dataclass
class ScoreMap:
    """Strictly increasing map from raw image scores to (0, 1), fitted on normal scores.

    At a knot (a normal validation score) the value is its mid-rank empirical CDF: the share
    of normal scores below it plus half the share equal to it. Between knots it is linear.
    Beyond the largest knot ``x_max`` it is ``1 - q / (1 + (x - x_max) / tail_hi)`` with
    ``q = 1 - levels[-1]``: the share left above the largest normal score halves one tail scale
    beyond it and keeps shrinking; the lower tail mirrors it towards 0. Hyperbolic rather than
    exponential tails so that far scores stay apart: an exponential one reaches 1.0 in float64
    about 37 scales out.

    Float64 limits: the value rounds to 1.0 only once ``q / (1 + z) < 2**-54``, i.e. beyond
    ``z ~ q * 1.8e16`` tail scales (4e13 scales with 200 normal images); the lower tail never
    reaches 0 for finite scores. Raw scores closer than about ``2**-53 / slope`` (inside the
    range, some 1e-16 of the normal scores' spread) may round to one value: consecutive float32
    raw scores (2**-24 apart relative to their size) stay apart out to ``z ~ q * 5e8`` tail
    scales (1e6 with 200 normal images), except within ~1e-8 spreads of zero.

    Attributes:
        knots: sorted distinct normal validation scores (at most ``MAX_KNOTS``, min and max kept).
        levels: mid-rank empirical CDF at each knot, strictly increasing inside (0, 1).
        tail_lo, tail_hi: tail scales below the smallest and above the largest knot (> 0).
    """

    knots: list[float]
    levels: list[float]
    tail_lo: float
    tail_hi: float

    def __post_init__(self):
        self.knots = [float(v) for v in self.knots]
        self.levels = [float(v) for v in self.levels]
        k, p = np.asarray(self.knots), np.asarray(self.levels)
        if k.size == 0 or k.shape != p.shape or not (np.isfinite(k).all() and np.isfinite(p).all()):
            raise ValueError("score map needs as many finite levels as knots (>0)")
        if (np.diff(k) <= 0).any() or (np.diff(p) <= 0).any() or p[0] <= 0 or p[-1] >= 1:
            raise ValueError("score map knots and levels must increase strictly, levels inside (0, 1)")
        if not (self.tail_lo > 0 and self.tail_hi > 0 and math.isfinite(self.tail_lo + self.tail_hi)):
            raise ValueError(f"tail scales must be finite and > 0, got {self.tail_lo}, {self.tail_hi}")

    @classmethod
    def fit(cls, reference: np.ndarray) -> ScoreMap:
        """The map of a reference sample (normal validation scores), float64, finite, non-empty."""
        values, counts = np.unique(np.asarray(reference, dtype=np.float64), return_counts=True)
        levels = (np.cumsum(counts) - 0.5 * counts) / counts.sum()  # mid-rank: ties count half
        keep = _quantile_knots(levels)
        tail_lo, tail_hi = _tail_scales(reference)
        return cls(values[keep].tolist(), levels[keep].tolist(), tail_lo, tail_hi)

    def __call__(self, raw) -> np.ndarray:
        """Raw scores (any shape) to float64 values in (0, 1); NaN stays NaN.

        Every step is a correctly rounded monotone operation, and each segment is capped at
        its upper level, so the float64 result never decreases as the raw score grows.
        """
        x = np.asarray(raw, dtype=np.float64)
        k, p = np.asarray(self.knots), np.asarray(self.levels)
        with np.errstate(over="ignore"):  # far-out scores: the tails decide, not the overflowing segment
            # Distances floored at 0 keep each tail's denominator >= 1 where np.where discards it.
            lower = p[0] / (1.0 + np.maximum(k[0] - x, 0.0) / self.tail_lo)
            upper = 1.0 - (1.0 - p[-1]) / (1.0 + np.maximum(x - k[-1], 0.0) / self.tail_hi)
            inside = _interpolate(x, k, p)
        return np.where(x < k[0], lower, np.where(x > k[-1], upper, inside))


def _quantile_knots(levels: np.ndarray) -> np.ndarray:
    """Indices of at most ``MAX_KNOTS`` levels, evenly spread in level, first and last kept."""
    if levels.size <= MAX_KNOTS:
        return np.arange(levels.size)
    targets = np.linspace(levels[0], levels[-1], MAX_KNOTS)
    return np.unique(np.searchsorted(levels, targets).clip(0, levels.size - 1))


def _interpolate(x: np.ndarray, knots: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Piecewise-linear levels between knots, each segment capped at its upper level."""
    if knots.size == 1:
        return np.full_like(x, levels[0])
    i = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, knots.size - 2)
    t = (x - knots[i]) / (knots[i + 1] - knots[i])
    return np.minimum(levels[i] + t * (levels[i + 1] - levels[i]), levels[i + 1])


def _tail_scales(reference: np.ndarray) -> tuple[float, float]:
    """Spread of the lowest and of the highest ``TAIL_SHARE`` of the reference scores (> 0).

    A side without spread (ties, tiny sets) falls back to the whole range, then to the
    scores' magnitude, then to 1.
    """
    r = np.asarray(reference, dtype=np.float64)
    lo, hi = float(r.min()), float(r.max())
    q_lo, q_hi = (float(v) for v in np.quantile(r, [TAIL_SHARE, 1.0 - TAIL_SHARE]))
    fallback = (hi - lo) or max(abs(lo), abs(hi)) or 1.0
    return (q_lo - lo if q_lo > lo else fallback), (hi - q_hi if hi > q_hi else fallback)


@dataclass
class Calibration:
    """Image score map, pixel normalisation and thresholds; thresholds in normalised units.

    Attributes:
        image_threshold: max-F1 threshold on validation (or the normal quantile), normalised:
            ``normalize_scores(raw) >= image_threshold`` iff ``raw >= raw_image_threshold``.
        sensitivity_threshold: highest threshold that still flags ``target_sensitivity``
            of validation anomalies; equals ``image_threshold`` without anomalies.
        target_sensitivity: the recall that ``sensitivity_threshold`` aims for.
        version: ``SCORE_MAP_VERSION`` (``score_map``) or ``CLIPPED_VERSION`` (``score_lo``,
            ``score_hi``); dicts saved without one are format 1.
        score_map: the image score map (format 2).
        raw_image_threshold, raw_sensitivity_threshold: the thresholds in raw units (format 2).
        score_lo: raw image score mapped to 0 (format 1: median of normal validation scores).
        score_hi: raw image score mapped to 1 (format 1: 99th percentile of validation scores).
        pixel_lo, pixel_hi, pixel_threshold: clipped linear map normalisation for anomaly maps,
            as ``score_lo``/``score_hi`` in format 1; None if no maps were given.
        method: how thresholds were chosen ("valid-max-f1", or "normal-specificity-0.99" when the
            split has no anomalies; "normal-quantile-0.99" in artifacts written before).
        n_valid: number of validation images.
    """

    image_threshold: float
    sensitivity_threshold: float
    target_sensitivity: float = 0.95
    version: int = CLIPPED_VERSION
    score_map: ScoreMap | None = None
    raw_image_threshold: float | None = None
    raw_sensitivity_threshold: float | None = None
    score_lo: float | None = None
    score_hi: float | None = None
    pixel_lo: float | None = None
    pixel_hi: float | None = None
    pixel_threshold: float | None = None
    method: str = "valid-max-f1"
    n_valid: int = 0

    def __post_init__(self):
        if self.version not in (CLIPPED_VERSION, SCORE_MAP_VERSION):
            raise ValueError(f"calibration format {self.version}: this adcore reads formats 1 and 2")
        if isinstance(self.score_map, dict):  # as loaded from config.json
            self.score_map = ScoreMap(**self.score_map)
        if self.version == SCORE_MAP_VERSION and self.score_map is None:
            raise ValueError("a format-2 calibration needs a score_map")
        if self.version == CLIPPED_VERSION and (self.score_lo is None or self.score_hi is None):
            raise ValueError("a format-1 calibration needs score_lo and score_hi")

    def normalize_scores(self, raw) -> np.ndarray:
        """Raw image scores to [0, 1], in float64 like the fitted thresholds.

        Format 2: strictly increasing, inside (0, 1) (see :class:`ScoreMap`). Format 1: the
        clipped linear map, as the artifact was scored when it was written.
        """
        x = np.asarray(raw, dtype=np.float64)
        if self.version == SCORE_MAP_VERSION:
            return self.score_map(x)
        return _normalize(x, self.score_lo, self.score_hi)

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
        """Load a saved dict, of either format (one without ``version`` is format 1)."""
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


def _raw_thresholds(
    y: np.ndarray, s: np.ndarray, target_sensitivity: float, target_specificity: float
) -> tuple[str, float, float]:
    """Threshold method, max-F1 (or specificity) raw threshold and sensitivity raw threshold."""
    if y.any():
        if y.sum() < MIN_STABLE_ANOMALIES:
            log.warning(
                "max-F1 threshold from only %d validation anomalies: it may not hold on new data "
                "(%d or more make it stable)",
                int(y.sum()),
                MIN_STABLE_ANOMALIES,
            )
        return "valid-max-f1", f1_max(y, s)[1], _sensitivity_raw(s[y], target_sensitivity)
    thr = float(np.quantile(s, target_specificity))
    return f"normal-specificity-{target_specificity:g}", thr, thr


def fit_calibration(
    labels,
    scores,
    masks=None,
    maps=None,
    target_sensitivity: float = 0.95,
    target_specificity: float = DEFAULT_SPECIFICITY,
) -> Calibration:
    """Fit the score map and thresholds on the validation split (never on the test set).

    Args:
        labels: 0 = normal, 1 = anomalous, one per validation image.
        scores: raw image scores.
        masks: optional ground-truth masks (HxW, nonzero = anomalous); entries may be
            None for normal images.
        maps: optional raw anomaly maps (HxW) for the pixel calibration.
        target_sensitivity: recall on anomalies for ``sensitivity_threshold``.
        target_specificity: without validation anomalies, the share of normal validation images
            left below both thresholds.

    The score map is fitted on the normal validation scores (on all of them when the
    split has no normal image): training scores would sit too low for a memory bank.
    With anomalies, thresholds are the max-F1 threshold and the sensitivity operating
    point; without (normal-only validation data), both are the ``target_specificity``
    quantile of normal scores. They are stored raw and
    mapped through the same strictly increasing map, so comparing normalised values
    decides exactly as comparing raw ones.
    """
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size == 0 or y.shape != s.shape:
        raise ValueError(f"need as many labels as scores (>0), got {y.size} and {s.size}")
    if not np.isfinite(s).all():
        raise ValueError("validation scores contain NaN or infinite values")
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    if not 0.0 < target_specificity < 1.0:
        raise ValueError(f"target_specificity must be in (0, 1), got {target_specificity}")

    score_map = ScoreMap.fit(s[~y] if (~y).any() else s)
    method, thr, sens = _raw_thresholds(y, s, target_sensitivity, target_specificity)
    calib = Calibration(
        image_threshold=float(score_map(thr)),
        sensitivity_threshold=float(score_map(sens)),
        target_sensitivity=target_sensitivity,
        version=SCORE_MAP_VERSION,
        score_map=score_map,
        raw_image_threshold=thr,
        raw_sensitivity_threshold=sens,
        method=method,
        n_valid=int(y.size),
    )
    if maps is not None:
        calib.pixel_lo, calib.pixel_hi, calib.pixel_threshold = _fit_pixels(y, masks, maps)
    return calib


def _fit_pixels(y: np.ndarray, masks, maps) -> tuple[float, float, float]:
    """Pixel lo, hi and threshold of the clipped linear map (threshold: max-F1 on anomalous images)."""
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
        thr = float(np.quantile(normal_px, DEFAULT_SPECIFICITY))
    lo, hi = _range(lo, hi, [thr], px)
    return lo, hi, _to_unit(thr, lo, hi)

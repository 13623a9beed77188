"""Anomaly detection metrics as plain functions on NumPy arrays.

Image-level: AUROC, best F1, metrics at a fixed threshold. Pixel-level: AUROC,
AUPRO (per-region overlap), Dice and IoU. Every function checks its inputs and
raises ``ValueError`` with the reason when a metric is undefined.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

# 8-connectivity for ground-truth regions, as in the MVTec AD evaluation code.
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)


def _as_binary_labels(labels, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels).ravel()
    if y.size and not np.isin(y, (0, 1, False, True)).all():
        raise ValueError(f"{name} must be 0/1 or boolean, got values {np.unique(y)[:5]}")
    return y.astype(bool)


def _check_pair(y: np.ndarray, s: np.ndarray) -> None:
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.shape} vs {s.shape}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U); tied scores share ranks.

    Raises:
        ValueError: if only one class is present.
    """
    y = _as_binary_labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    _check_pair(y, s)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both normal (0) and anomalous (1) labels; got only one class")
    ranks = rankdata(s, method="average")
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _stack_flat(arrays, name: str) -> list[np.ndarray]:
    if isinstance(arrays, np.ndarray) and arrays.ndim == 2:
        arrays = [arrays]
    out = [np.asarray(a) for a in arrays]
    if not out:
        raise ValueError(f"{name} is empty")
    return out


def _paired_pixels(masks, maps) -> tuple[list[np.ndarray], list[np.ndarray]]:
    mask_list = _stack_flat(masks, "masks")
    map_list = _stack_flat(maps, "maps")
    if len(mask_list) != len(map_list):
        raise ValueError(f"{len(mask_list)} masks but {len(map_list)} maps")
    for i, (m, a) in enumerate(zip(mask_list, map_list)):
        if m.shape != a.shape:
            raise ValueError(f"mask {i} has shape {m.shape} but map {i} has shape {a.shape}")
    return [m > 0 for m in mask_list], [a.astype(np.float64, copy=False) for a in map_list]


def stratified_subsample(labels: np.ndarray, max_items: int, seed: int = 0) -> np.ndarray | None:
    """Indices of a deterministic subsample keeping the class ratio, or None if small enough.

    Each present class keeps at least one item, so AUROC stays defined.
    """
    n = labels.size
    if n <= max_items:
        return None
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(labels)
    neg = np.flatnonzero(~labels)
    n_pos = min(pos.size, max(1 if pos.size else 0, round(max_items * pos.size / n)))
    n_neg = min(neg.size, max_items - n_pos)
    keep = np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])
    return np.sort(keep)


def pixel_auroc(masks, maps, max_pixels: int = 2_000_000, seed: int = 0) -> float:
    """Pixel-level AUROC over all pixels of all images.

    Args:
        masks: ground-truth masks (list or array of HxW; nonzero = anomalous).
        maps: anomaly maps of the same shapes.
        max_pixels: above this many pixels a deterministic, class-stratified
            subsample of this size is scored, to bound memory and time.
        seed: seed of that subsample.
    """
    mask_list, map_list = _paired_pixels(masks, maps)
    y = np.concatenate([m.ravel() for m in mask_list])
    s = np.concatenate([a.ravel() for a in map_list])
    keep = stratified_subsample(y, max_pixels, seed)
    if keep is not None:
        y, s = y[keep], s[keep]
    return image_auroc(y, s)


def _trapezoid_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under a curve with non-decreasing x, from x[0] up to ``limit`` (interpolated)."""
    inside = x <= limit
    xs, ys = x[inside], y[inside]
    nxt = np.flatnonzero(~inside)
    if nxt.size:
        j = nxt[0]
        x0, y0, x1, y1 = x[j - 1], y[j - 1], x[j], y[j]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs, ys = np.append(xs, limit), np.append(ys, y_lim)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(masks, maps, fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by the limit.

    For each of ``num_thresholds`` thresholds evenly spaced between the lowest and
    highest map value, PRO is the mean over all ground-truth regions (8-connected
    components, every image pooled) of the fraction of the region at or above the
    threshold, and FPR is the fraction of normal pixels at or above it. The curve
    runs from (0, 0) to (1, 1); a perfect map scores 1.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
    mask_list, map_list = _paired_pixels(masks, maps)
    all_scores = np.concatenate([a.ravel() for a in map_list])
    if not np.isfinite(all_scores).all():
        raise ValueError("maps contain NaN or infinite values")
    thresholds = np.linspace(all_scores.min(), all_scores.max(), num_thresholds)

    # Bin b of a pixel = number of thresholds <= its score, so score >= t_j  <=>  b > j.
    n_bins = num_thresholds + 1
    region_hist, normal_hist, region_sizes = [], np.zeros(n_bins, np.int64), []
    for mask, amap in zip(mask_list, map_list):
        bins = np.searchsorted(thresholds, amap, side="right")
        normal_hist += np.bincount(bins[~mask], minlength=n_bins)
        regions, n_regions = ndimage.label(mask, structure=_REGION_STRUCTURE)
        if n_regions == 0:
            continue
        inside = regions > 0
        flat = (regions[inside] - 1) * n_bins + bins[inside]
        hist = np.bincount(flat, minlength=n_regions * n_bins).reshape(n_regions, n_bins)
        region_hist.append(hist)
        region_sizes.append(hist.sum(axis=1))
    if not region_hist:
        raise ValueError("AUPRO needs at least one anomalous pixel in the masks")
    n_normal = normal_hist.sum()
    if n_normal == 0:
        raise ValueError("AUPRO needs at least one normal pixel in the masks")

    hist = np.concatenate(region_hist)  # [R, T+1]
    sizes = np.concatenate(region_sizes)  # [R]
    # Count at or above threshold j = sum of bins j+1 .. T (reverse cumulative sum).
    region_ge = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # [R, T]
    normal_ge = np.cumsum(normal_hist[::-1])[::-1][1:]  # [T]
    pro = (region_ge / sizes[:, None]).mean(axis=0)
    fpr = normal_ge / n_normal
    # Highest threshold first: both FPR and PRO then rise; close the curve at (0,0) and (1,1).
    fpr = np.concatenate([[0.0], fpr[::-1], [1.0]])
    pro = np.concatenate([[0.0], pro[::-1], [1.0]])
    return _trapezoid_to_limit(fpr, pro, fpr_limit) / fpr_limit


def _counts_per_threshold(y: np.ndarray, s: np.ndarray):
    """Distinct thresholds (descending) and TP/FP counts of ``s >= threshold`` at each."""
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    last_of_value = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    return s_sorted[last_of_value], tp[last_of_value], fp[last_of_value]


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds (prediction = score >= threshold) and that threshold.

    The threshold is one of the given scores; among equal F1 the highest one wins.
    """
    y = _as_binary_labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    _check_pair(y, s)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("F1 needs at least one anomalous (1) label")
    thresholds, tp, fp = _counts_per_threshold(y, s)
    f1 = 2.0 * tp / (tp + fp + n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def threshold_metrics(labels, scores, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall, specificity and F1 of ``score >= threshold``.

    A ratio with an empty denominator is reported as 0.0.
    """
    y = _as_binary_labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    _check_pair(y, s)
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    return {
        "acc": _safe_div(tp + tn, y.size),
        "precision": _safe_div(tp, tp + fp),
        "recall": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
    }


def _mask_pair(pred_mask, gt_mask) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred_mask) > 0, np.asarray(gt_mask) > 0
    if p.shape != g.shape:
        raise ValueError(f"pred_mask {p.shape} and gt_mask {g.shape} differ in shape")
    return p, g


def dice(pred_mask, gt_mask) -> float:
    """Dice coefficient 2|P&G| / (|P|+|G|); two empty masks agree perfectly (1.0)."""
    p, g = _mask_pair(pred_mask, gt_mask)
    total = int(p.sum() + g.sum())
    return 1.0 if total == 0 else 2.0 * int(np.sum(p & g)) / total


def iou(pred_mask, gt_mask) -> float:
    """Intersection over union |P&G| / |P|G|; two empty masks agree perfectly (1.0)."""
    p, g = _mask_pair(pred_mask, gt_mask)
    union = int(np.sum(p | g))
    return 1.0 if union == 0 else int(np.sum(p & g)) / union


__all__: Sequence[str] = (
    "aupro",
    "dice",
    "f1_max",
    "image_auroc",
    "iou",
    "pixel_auroc",
    "stratified_subsample",
    "threshold_metrics",
)


# ----------------------------------------------------------------------------- multi-anomaly protocols
# SD-MAD (papers.md section 2) names three protocols without defining them; adcore's three:
# (1) normal vs any anomaly, image AUROC; (2) each category against the rest (normals included),
# AUROC averaged over categories; (3) accuracy and macro-F1 over the classes {normal, categories}.
NORMAL_CLASS = "normal"


def _category_labels(categories: Sequence) -> np.ndarray:
    """Per-image class names: None / NaN / "normal" -> NORMAL_CLASS."""
    out = []
    for c in categories:
        missing = c is None or (isinstance(c, float) and np.isnan(c))
        out.append(NORMAL_CLASS if missing else str(c))
    return np.array(out, dtype=object)


def category_auroc(categories: Sequence, category_scores, names: Sequence[str]) -> dict[str, float]:
    """Protocol 2: one-vs-rest AUROC per category, and their mean (``"mean"``).

    Args:
        categories: Each image's true category (None or ``"normal"`` for normal images).
        category_scores: [N, C] per-category scores, columns in ``names`` order.
        names: Category names; a category absent from ``categories`` is left out of the mean.
    """
    y = _category_labels(categories)
    s = np.asarray(category_scores, dtype=np.float64)
    if s.shape != (len(y), len(names)):
        raise ValueError(f"category_scores must be [{len(y)}, {len(names)}], got {s.shape}")
    out = {name: image_auroc(y == name, s[:, j]) for j, name in enumerate(names) if 0 < (y == name).sum() < len(y)}
    if not out:
        raise ValueError("no category has both positive and negative images")
    out["mean"] = float(np.mean(list(out.values())))
    return out


def multiclass_metrics(true: Sequence, predicted: Sequence, classes: Sequence[str] | None = None) -> dict:
    """Protocol 3: accuracy and macro-F1 over {normal, categories} (None counts as normal).

    Macro-F1 averages the per-class F1 over ``classes`` (default: every class in ``true``); a
    class never predicted and never true is left out, one predicted but absent from ``true``
    lowers precision elsewhere only.
    """
    t, p = _category_labels(true), _category_labels(predicted)
    if t.shape != p.shape or not t.size:
        raise ValueError(f"true and predicted must be equal, non-empty lengths: {t.shape} vs {p.shape}")
    classes = list(dict.fromkeys(classes)) if classes is not None else sorted(set(t))
    f1 = {}
    for c in classes:
        tp, fp, fn = np.sum((p == c) & (t == c)), np.sum((p == c) & (t != c)), np.sum((p != c) & (t == c))
        if tp + fp + fn:
            f1[c] = _safe_div(2 * tp, 2 * tp + fp + fn)
    return {"accuracy": float(np.mean(t == p)), "macro_f1": float(np.mean(list(f1.values()))), "f1": f1}


def multi_anomaly_metrics(
    categories: Sequence, anomaly_scores, category_scores, names: Sequence[str], predicted: Sequence
) -> dict:
    """All three protocols: ``normal_vs_any_auroc``, ``category_auroc`` (mean) with per-category
    values, ``accuracy`` and ``macro_f1`` over {normal, categories} of the ``predicted`` classes."""
    y = _category_labels(categories)
    out = {"normal_vs_any_auroc": image_auroc(y != NORMAL_CLASS, anomaly_scores)}
    per = category_auroc(categories, category_scores, names)
    out["category_auroc"] = per.pop("mean")
    out["category_auroc_per"] = per
    mc = multiclass_metrics(categories, predicted, [NORMAL_CLASS, *names])
    out |= {"accuracy": mc["accuracy"], "macro_f1": mc["macro_f1"], "f1_per_class": mc["f1"]}
    return out

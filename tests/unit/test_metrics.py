"""Metrics against scikit-learn, hand-computed cases and a plain-loop AUPRO reference."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, f1_score, precision_recall_curve, roc_auc_score

from adcore import metrics


def _pro_reference(masks, maps, fpr_limit, num_thresholds):
    """Straightforward AUPRO: binarise at each threshold, loop over regions."""
    maps = [np.asarray(a, dtype=np.float64) for a in maps]
    masks = [np.asarray(m) > 0 for m in masks]
    lo = min(a.min() for a in maps)
    hi = max(a.max() for a in maps)
    points = [(0.0, 0.0), (1.0, 1.0)]
    for t in np.linspace(lo, hi, num_thresholds):
        overlaps, fp, n_normal = [], 0, 0
        for mask, amap in zip(masks, maps):
            pred = amap >= t
            fp += int(np.sum(pred & ~mask))
            n_normal += int(np.sum(~mask))
            labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
            for r in range(1, n + 1):
                region = labelled == r
                overlaps.append(np.sum(pred & region) / np.sum(region))
        points.append((fp / n_normal, float(np.mean(overlaps))))
    points.sort()
    fpr = np.array([p[0] for p in points])
    pro = np.array([p[1] for p in points])
    keep = fpr <= fpr_limit
    x, y = list(fpr[keep]), list(pro[keep])
    if x[-1] < fpr_limit:
        y.append(float(np.interp(fpr_limit, fpr, pro)))
        x.append(fpr_limit)
    return auc(x, y) / fpr_limit


def _defect_images(rng, n=4, size=32):
    masks, maps = [], []
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        if i % 2:  # odd images carry two defects of different sizes
            mask[4:10, 4:12] = 1
            mask[20:23, 18:30] = 255
        amap = rng.normal(0.0, 1.0, (size, size)) + 1.5 * (mask > 0)
        masks.append(mask)
        maps.append(amap)
    return masks, maps


def test_image_auroc_matches_sklearn_with_ties(rng):
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounding forces many ties
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_image_auroc_hand_cases():
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.image_auroc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert metrics.image_auroc([0, 1], [0.5, 0.5]) == 0.5
    # one pair of four misordered
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.35, 0.3, 0.4]) == 0.75


def test_image_auroc_one_class_raises():
    with pytest.raises(ValueError, match="one class"):
        metrics.image_auroc([1, 1, 1], [0.1, 0.2, 0.3])


def test_pixel_auroc_matches_sklearn_and_subsample(rng):
    masks, maps = _defect_images(rng)
    y = np.concatenate([(m > 0).ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s))
    assert metrics.pixel_auroc(np.stack(masks), np.stack(maps)) == pytest.approx(roc_auc_score(y, s))
    sub = metrics.pixel_auroc(masks, maps, max_pixels=1000, seed=3)
    assert sub == metrics.pixel_auroc(masks, maps, max_pixels=1000, seed=3)
    assert sub == pytest.approx(roc_auc_score(y, s), abs=0.05)


def test_pixel_auroc_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        metrics.pixel_auroc([np.zeros((4, 4))], [np.zeros((4, 5))])


def test_stratified_subsample_keeps_rare_class():
    y = np.zeros(10_000, bool)
    y[17] = True
    keep = metrics.stratified_subsample(y, 100, seed=0)
    assert keep.size == 100 and y[keep].sum() == 1


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_reference(rng, fpr_limit):
    masks, maps = _defect_images(rng)
    got = metrics.aupro(masks, maps, fpr_limit=fpr_limit, num_thresholds=50)
    ref = _pro_reference(masks, maps, fpr_limit, 50)
    assert got == pytest.approx(ref, abs=1e-9)
    assert 0.0 < got < 1.0


def test_aupro_perfect_and_region_weighting():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:4, 2:4] = 1  # small region
    mask[10:20, 10:20] = 1  # large region
    assert metrics.aupro([mask], [mask.astype(float)]) == pytest.approx(1.0)
    # Only the large region detected: PRO is 0.5 at FPR 0 whatever the region sizes; the
    # next point is (1, 1), so the interpolated curve is 0.5 + 0.5 * fpr.
    amap = np.zeros((20, 20))
    amap[10:20, 10:20] = 1.0
    for limit in (0.1, 0.3):
        assert metrics.aupro([mask], [amap], fpr_limit=limit) == pytest.approx(0.5 + 0.25 * limit)


def test_aupro_needs_both_pixel_kinds():
    with pytest.raises(ValueError, match="anomalous pixel"):
        metrics.aupro([np.zeros((4, 4))], [np.ones((4, 4))])
    with pytest.raises(ValueError, match="normal pixel"):
        metrics.aupro([np.ones((4, 4))], [np.ones((4, 4))])


def test_f1_max_matches_sklearn(rng):
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)
    best, thr = metrics.f1_max(labels, scores)
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nanmax(2 * p * r / (p + r))
    assert best == pytest.approx(ref)
    assert f1_score(labels, scores >= thr) == pytest.approx(best)
    assert thr in scores


def test_f1_max_hand_case():
    best, thr = metrics.f1_max([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    assert (best, thr) == (1.0, 0.3)


def test_threshold_metrics_hand_case():
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.6, 0.2, 0.7, 0.4]
    got = metrics.threshold_metrics(labels, scores, 0.5)
    # pred = [0,1,0,1,0]: TP=1 FP=1 FN=1 TN=2
    assert got == pytest.approx({"acc": 3 / 5, "precision": 0.5, "recall": 0.5, "specificity": 2 / 3, "f1": 0.5})
    none_pred = metrics.threshold_metrics(labels, scores, 2.0)
    assert none_pred["precision"] == 0.0 and none_pred["specificity"] == 1.0


def test_dice_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert metrics.dice(a, b) == 1.0 and metrics.iou(a, b) == 1.0
    a[0, :2] = True  # 2 pixels
    b[0, 1:4] = True  # 3 pixels, 1 shared
    assert metrics.dice(a, b) == pytest.approx(2 * 1 / 5)
    assert metrics.iou(a, b) == pytest.approx(1 / 4)
    assert metrics.dice(a, np.zeros((4, 4))) == 0.0
    with pytest.raises(ValueError, match="shape"):
        metrics.iou(a, np.zeros((3, 3)))


# ----------------------------------------------------------------------------- multi-anomaly protocols
# Six images: two normal, two "cyst", two "mass"; scores written so each value is countable by hand.
_TRUE = [None, "normal", "cyst", "cyst", "mass", "mass"]
_ANY = [0.1, 0.4, 0.3, 0.9, 0.8, 0.7]  # normal vs any: positives {0.3, 0.9, 0.8, 0.7} vs negatives {0.1, 0.4}
_PER = np.array(  # columns cyst, mass
    [[0.1, 0.2], [0.3, 0.1], [0.6, 0.2], [0.5, 0.4], [0.2, 0.9], [0.7, 0.3]]
)
_PRED = ["normal", "cyst", "cyst", "mass", "mass", None]


def test_normal_vs_any_and_one_vs_rest_by_hand():
    m = metrics.multi_anomaly_metrics(_TRUE, _ANY, _PER, ["cyst", "mass"], _PRED)
    # 0.3 beats 0.1 only (1 of 2), 0.9, 0.8 and 0.7 beat both: (1 + 2 + 2 + 2) / 8.
    assert m["normal_vs_any_auroc"] == pytest.approx(7 / 8)
    # cyst: positives {0.6, 0.5} vs {0.1, 0.3, 0.2, 0.7}: 0.6 beats 3, 0.5 beats 3 -> 6 / 8.
    # mass: positives {0.9, 0.3} vs {0.2, 0.1, 0.2, 0.4}: 0.9 beats 4, 0.3 beats 3 -> 7 / 8.
    assert m["category_auroc_per"] == pytest.approx({"cyst": 6 / 8, "mass": 7 / 8})
    assert m["category_auroc"] == pytest.approx((6 / 8 + 7 / 8) / 2)
    assert m["category_auroc_per"]["cyst"] == pytest.approx(roc_auc_score([t == "cyst" for t in _TRUE], _PER[:, 0]))


def test_accuracy_and_macro_f1_by_hand():
    m = metrics.multiclass_metrics(_TRUE, _PRED, ["normal", "cyst", "mass"])
    # Right: image 0 (normal), 2 (cyst), 4 (mass) -> 3 / 6.
    assert m["accuracy"] == pytest.approx(0.5)
    # normal: tp 1 (img 0), fp 1 (img 5 predicted None = normal), fn 1 (img 1 -> cyst): F1 2/4.
    # cyst: tp 1 (img 2), fp 1 (img 1), fn 1 (img 3): 2/4. mass: tp 1 (img 4), fp 1 (img 3), fn 1 (img 5): 2/4.
    assert m["f1"] == pytest.approx({"normal": 0.5, "cyst": 0.5, "mass": 0.5})
    assert m["macro_f1"] == pytest.approx(0.5)
    labels = ["normal" if t is None else t for t in _TRUE]
    preds = ["normal" if p is None else p for p in _PRED]
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))


def test_multi_anomaly_inputs_are_checked():
    with pytest.raises(ValueError, match="category_scores"):
        metrics.category_auroc(_TRUE, _PER[:, :1], ["cyst", "mass"])
    with pytest.raises(ValueError, match="equal"):
        metrics.multiclass_metrics(_TRUE, _PRED[:3])

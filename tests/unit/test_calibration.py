"""Calibration fitted on synthetic validation splits."""

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from adcore.calibration import Calibration, fit_calibration


def _split(rng, n_normal=200, n_anomalous=20):
    labels = np.r_[np.zeros(n_normal, int), np.ones(n_anomalous, int)]
    scores = np.r_[rng.normal(1.0, 0.3, n_normal), rng.normal(2.5, 0.5, n_anomalous)]
    return labels, scores


def test_fit_with_anomalies(rng):
    labels, scores = _split(rng)
    calib = fit_calibration(labels, scores)
    assert calib.method == "valid-max-f1" and calib.n_valid == 220
    assert calib.score_lo == pytest.approx(np.median(scores[:200]))
    assert calib.score_hi >= np.percentile(scores, 99)
    norm = calib.normalize_scores(scores)
    assert norm.min() >= 0.0 and norm.max() <= 1.0
    # The normalised threshold decides exactly like the max-F1 raw threshold.
    pred = norm >= calib.image_threshold
    best_f1 = max(f1_score(labels, scores >= t) for t in scores)
    assert f1_score(labels, pred) == pytest.approx(best_f1)
    # The sensitivity point flags at least the target share of anomalies, and is the
    # highest such threshold: anomalies strictly above it fall short of the target.
    anomalous = norm[labels == 1]
    assert (anomalous >= calib.sensitivity_threshold).mean() >= 0.95
    assert (anomalous > calib.sensitivity_threshold).mean() < 0.95


def test_no_anomalies_uses_normal_quantile(rng):
    scores = rng.normal(0.0, 1.0, 500)
    calib = fit_calibration(np.zeros(500), scores)
    assert calib.method == "normal-quantile-0.99"
    flagged = (calib.normalize_scores(scores) >= calib.image_threshold).mean()
    assert flagged == pytest.approx(0.01, abs=0.005)
    assert calib.sensitivity_threshold == calib.image_threshold


def test_constant_scores_and_tiny_sets():
    calib = fit_calibration([0, 0, 1], [2.0, 2.0, 2.0])
    assert calib.score_hi > calib.score_lo
    assert np.isfinite(calib.normalize_scores([2.0, 5.0, -1.0])).all()
    one = fit_calibration([1], [0.3])
    assert one.normalize_scores([0.3])[0] >= one.image_threshold
    with pytest.raises(ValueError, match="labels"):
        fit_calibration([], [])
    with pytest.raises(ValueError, match="NaN"):
        fit_calibration([0, 1], [0.1, np.nan])


def test_pixel_calibration(rng):
    labels, scores = _split(rng, n_normal=6, n_anomalous=4)
    maps, masks = [], []
    for lab in labels:
        mask = np.zeros((24, 24), np.uint8)
        if lab:
            mask[5:12, 8:16] = 1
        maps.append((rng.normal(0, 1, mask.shape) + 3.0 * mask).astype(np.float32))
        masks.append(mask if lab else None)
    calib = fit_calibration(labels, scores, masks=masks, maps=maps)
    normal_px = np.concatenate([m.ravel() for m, lab in zip(maps, labels) if not lab])
    assert calib.pixel_lo <= np.median(normal_px) + 0.5
    norm = calib.normalize_maps(maps[-1])
    assert norm.dtype == np.float32 and norm.min() >= 0 and norm.max() <= 1
    gt = np.concatenate([m.ravel() for m in masks[6:]])
    pred = np.concatenate([(calib.normalize_maps(a) >= calib.pixel_threshold).ravel() for a in maps[6:]])
    assert f1_score(gt, pred) > 0.8


def test_pixel_calibration_without_masks_and_missing_maps(rng):
    maps = [rng.normal(0, 1, (8, 8)) for _ in range(3)]
    calib = fit_calibration([0, 0, 0], [0.1, 0.2, 0.3], maps=maps)
    assert calib.pixel_threshold is not None
    no_maps = fit_calibration([0, 1], [0.1, 0.9])
    assert no_maps.pixel_threshold is None
    with pytest.raises(ValueError, match="pixel"):
        no_maps.normalize_maps(maps[0])


def test_dict_round_trip(rng):
    labels, scores = _split(rng)
    calib = fit_calibration(labels, scores, target_sensitivity=0.9)
    again = Calibration.from_dict(json.loads(json.dumps(calib.to_dict())))
    assert again == calib
    with pytest.raises(ValueError, match="unknown"):
        Calibration.from_dict({**calib.to_dict(), "bogus": 1})

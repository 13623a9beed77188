"""Calibration fitted on synthetic validation splits."""

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from adcore.artifact import load_artifact, save_artifact
from adcore.calibration import MAX_KNOTS, Calibration, fit_calibration
from adcore.metrics import f1_max
from adcore.scorer import load as scorer_load


def _split(rng, n_normal=200, n_anomalous=20):
    labels = np.r_[np.zeros(n_normal, int), np.ones(n_anomalous, int)]
    scores = np.r_[rng.normal(1.0, 0.3, n_normal), rng.normal(2.5, 0.5, n_anomalous)]
    return labels, scores


def test_fit_with_anomalies(rng):
    labels, scores = _split(rng)
    calib = fit_calibration(labels, scores)
    assert calib.method == "valid-max-f1" and calib.n_valid == 220
    # Fitted on the normal scores: their median maps to about one half.
    assert calib.normalize_scores(np.median(scores[:200])) == pytest.approx(0.5, abs=0.01)
    norm = calib.normalize_scores(scores)
    assert norm.min() > 0.0 and norm.max() < 1.0
    # The normalised threshold decides exactly like the max-F1 raw threshold.
    pred = norm >= calib.image_threshold
    best_f1 = max(f1_score(labels, scores >= t) for t in scores)
    assert f1_score(labels, pred) == pytest.approx(best_f1)
    # The sensitivity point flags at least the target share of anomalies, and is the
    # highest such threshold: anomalies strictly above it fall short of the target.
    anomalous = norm[labels == 1]
    assert (anomalous >= calib.sensitivity_threshold).mean() >= 0.95
    assert (anomalous > calib.sensitivity_threshold).mean() < 0.95


def test_no_anomalies_uses_the_target_specificity(rng):
    scores = rng.normal(0.0, 1.0, 500)
    calib = fit_calibration(np.zeros(500), scores)
    assert calib.method == "normal-specificity-0.99"
    flagged = (calib.normalize_scores(scores) >= calib.image_threshold).mean()
    assert flagged == pytest.approx(0.01, abs=0.005)
    assert calib.sensitivity_threshold == calib.image_threshold
    looser = fit_calibration(np.zeros(500), scores, target_specificity=0.9)
    assert looser.method == "normal-specificity-0.9"
    assert (looser.normalize_scores(scores) >= looser.image_threshold).mean() == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError, match="target_specificity"):
        fit_calibration(np.zeros(5), scores[:5], target_specificity=1.0)


def test_constant_scores_and_tiny_sets():
    calib = fit_calibration([0, 0, 1], [2.0, 2.0, 2.0])
    norm = calib.normalize_scores([-1.0, 2.0, 5.0])
    assert np.isfinite(norm).all() and (np.diff(norm) > 0).all() and norm[1] == 0.5
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
    broken = calib.to_dict()
    broken["score_map"]["levels"] = broken["score_map"]["levels"][::-1]
    with pytest.raises(ValueError, match="increase strictly"):
        Calibration.from_dict(broken)


# --- the strictly increasing score map (format 2) and format-1 artifacts -------------------------

# The format-1 dict exactly as the old Calibration.to_dict() wrote it (artifacts of calibration format 1).
OLD_FIELDS = (
    "score_lo",
    "score_hi",
    "image_threshold",
    "sensitivity_threshold",
    "target_sensitivity",
    "pixel_lo",
    "pixel_hi",
    "pixel_threshold",
    "method",
    "n_valid",
)


def _float32_split(rng, n_normal=200, n_anomalous=20):
    """A validation split whose raw scores are float32 values, as every head returns them."""
    labels, scores = _split(rng, n_normal, n_anomalous)
    return labels, scores.astype(np.float32).astype(np.float64)


def _float32_neighbours(values, steps=3) -> np.ndarray:
    """Each value rounded to float32 and its ``steps`` nearest float32 neighbours on each side."""
    out = []
    for v in np.asarray(values, dtype=np.float32):
        up = down = v
        out.append(v)
        for _ in range(steps):
            up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
            out += [up, down]
    return np.asarray(out, dtype=np.float64)


def _raw_thresholds(labels, scores) -> tuple[float, float]:
    """The max-F1 and the 95 %-sensitivity raw thresholds, computed as the old fit did."""
    y, s = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    k = int(np.ceil(0.95 * y.sum()))  # anomalies that must be flagged
    return f1_max(y, s)[1], float(np.sort(s[y])[::-1][k - 1])


def _old_fit(labels, scores) -> dict:
    """The format-1 calibration dict the old fit_calibration wrote (clipped linear map)."""
    y, s = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    thr, sens = _raw_thresholds(y, s)
    lo = min(float(np.median(s[~y])), thr, sens)
    hi = max(float(np.percentile(s, 99.0)), thr, sens)
    unit = lambda v: float(np.clip((v - lo) / (hi - lo), 0.0, 1.0))
    values = (lo, hi, unit(thr), unit(sens), 0.95, None, None, None, "valid-max-f1", int(y.size))
    return dict(zip(OLD_FIELDS, values))


def test_score_map_is_strictly_increasing_over_the_whole_range(rng):
    labels, scores = _float32_split(rng)
    calib = fit_calibration(labels, scores)
    assert calib.version == 2 and len(calib.score_map.knots) == 200
    knots = np.asarray(calib.score_map.knots)
    spread = knots[-1] - knots[0]
    realistic = np.r_[
        np.linspace(knots[0] - 10 * spread, knots[-1] + 10 * spread, 20_001),
        knots[-1] + spread * np.geomspace(1e-6, 1e3, 200),
        knots[0] - spread * np.geomspace(1e-6, 1e3, 200),
    ]
    # Neighbouring float32 raw scores: at every knot, the thresholds, the sample and out to 1e3 spreads.
    close = _float32_neighbours(np.r_[knots, scores, calib.raw_image_threshold, realistic[::50]])
    far = np.r_[knots[-1] + spread * np.geomspace(1e3, 1e6, 100), knots[0] - spread * np.geomspace(1e3, 1e6, 100)]
    x = np.unique(np.r_[realistic, close, far])
    norm = calib.normalize_scores(x)
    assert norm.dtype == np.float64
    assert norm.min() > 0.0 and norm.max() < 1.0, "no plateau at 0 or 1, even 1e6 spreads out"
    assert (np.diff(norm) > 0).all(), "distinct raw scores map to distinct values, in order"
    # float32 like the scorer's own input (postprocess casts raw scores to float32 first)
    assert (np.diff(calib.normalize_scores(np.unique(close.astype(np.float32)))) > 0).all()


def test_score_map_meaning_ties_and_bounded_knots(rng):
    # Normal scores 1, 2, 2, 3: the share below each, ties counting half.
    calib = fit_calibration(np.zeros(4), [1.0, 2.0, 2.0, 3.0])
    np.testing.assert_allclose(calib.normalize_scores([1.0, 2.0, 3.0]), [0.125, 0.5, 0.875])
    above = calib.score_map.knots[-1] + calib.score_map.tail_hi  # one tail scale above the largest
    assert calib.normalize_scores(above) == pytest.approx(1 - 0.125 / 2)
    # Many normal images, many ties: knots stay bounded, the map strictly increasing, levels ECDF-close.
    normal = np.round(rng.normal(5.0, 1.0, 5000), 2)  # positive, like distances (no knot at 0.0)
    calib = fit_calibration(np.zeros(normal.size), normal)
    score_map = calib.score_map
    assert len(score_map.knots) <= MAX_KNOTS
    assert score_map.knots[0] == normal.min() and score_map.knots[-1] == normal.max()
    x = np.unique(np.r_[normal, _float32_neighbours(score_map.knots)])
    norm = calib.normalize_scores(x)
    assert (np.diff(norm) > 0).all() and norm.min() > 0 and norm.max() < 1
    ranks = np.sort(normal)
    ecdf = (np.searchsorted(ranks, x, "left") + np.searchsorted(ranks, x, "right")) / (2 * normal.size)
    tie = np.unique(normal, return_counts=True)[1].max() / normal.size  # share of the most tied value
    # Off by at most one knot gap (1/255 plus a tie's jump) and half a tie's share between knots.
    assert np.abs(norm - ecdf).max() <= 1.0 / (MAX_KNOTS - 1) + 2 * tie


def test_thresholds_label_as_before(rng):
    labels, scores = _float32_split(rng)
    calib = fit_calibration(labels, scores)
    old = Calibration.from_dict(_old_fit(labels, scores))
    thr, sens = calib.raw_image_threshold, calib.raw_sensitivity_threshold
    assert (thr, sens) == _raw_thresholds(labels, scores)
    # The sample, the thresholds' float32 neighbours, and scores far beyond the range.
    x = np.r_[scores, _float32_neighbours([thr, sens], steps=5), -1e6, 1e6]
    norm, old_norm = calib.normalize_scores(x), old.normalize_scores(x)
    for new_thr, old_thr, raw_thr in [
        (calib.image_threshold, old.image_threshold, thr),
        (calib.sensitivity_threshold, old.sensitivity_threshold, sens),
    ]:
        np.testing.assert_array_equal(norm >= new_thr, x >= raw_thr)
        np.testing.assert_array_equal(norm >= new_thr, old_norm >= old_thr)


def test_old_calibration_dict_loads_and_normalises_as_before(rng):
    labels, scores = _float32_split(rng)
    data = _old_fit(labels, scores)
    old = Calibration.from_dict(json.loads(json.dumps(data)))
    assert old.version == 1 and old.score_map is None
    x = np.r_[scores, -1e6, 1e6]
    lo, hi = data["score_lo"], data["score_hi"]
    np.testing.assert_array_equal(old.normalize_scores(x), np.clip((x - lo) / (hi - lo), 0.0, 1.0))
    assert old.normalize_scores(1e6) == 1.0, "format 1 keeps its clipping: scored as when it was written"
    assert Calibration.from_dict(old.to_dict()) == old
    with pytest.raises(ValueError, match="score_lo"):
        Calibration.from_dict({k: v for k, v in data.items() if k != "score_hi"})
    with pytest.raises(ValueError, match="format 3"):
        Calibration.from_dict({**data, "version": 3})


def test_old_artifact_loads_and_scores(tiny_artifact, tmp_path, rng):
    art = load_artifact(tiny_artifact)
    new = scorer_load(tiny_artifact, use_gpu=False)
    assert new.calibration.version == 2
    size = new.input_size
    images = [rng.random((size, size)).astype(np.float32) for _ in range(8)]
    raw = np.array([r.raw_score for r in new.score_images(images)], dtype=np.float32).astype(np.float64)
    # A format-1 calibration whose range clips the lowest and highest quarter of these scores,
    # written into config.json through save_artifact (so the manifest matches).
    lo, hi = (float(v) for v in np.quantile(raw, [0.25, 0.75]))
    pixel = {k: getattr(new.calibration, k) for k in ("pixel_lo", "pixel_hi", "pixel_threshold")}
    values = (lo, hi, 0.5, 0.4, 0.95, *pixel.values(), "valid-max-f1", 8)
    config = {**art.config, "calibration": dict(zip(OLD_FIELDS, values))}
    save_artifact(tmp_path / "old", config, art.state_dict, art.arrays)

    old = scorer_load(str(tmp_path / "old"), use_gpu=False)
    assert old.calibration.version == 1 and old.version == new.version
    results = old.score_images(images)
    old_raw = np.array([r.raw_score for r in results])
    np.testing.assert_allclose(old_raw, raw, rtol=1e-6)
    np.testing.assert_array_equal([r.score for r in results], np.clip((old_raw - lo) / (hi - lo), 0.0, 1.0))
    assert {0.0, 1.0} <= {r.score for r in results}, "read as it was: clipped at both ends"
    assert [r.label for r in results] == [int(r.score >= 0.5) for r in results]
    assert all(r.mask is not None for r in results)

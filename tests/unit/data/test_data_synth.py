"""Anomaly synthesis: determinism, mask/image consistency, foreground (speed: bench/synth_speed.py)."""

import numpy as np
import pytest

from adcore.data.synth import LesionConfig, RandCutPaste, RandLesion, RandPerlinAnomaly, perlin_2d

N = 224


def head_image():
    yy, xx = np.mgrid[0:N, 0:N]
    fg = ((yy - 112) / 95) ** 2 + ((xx - 112) / 75) ** 2 < 1
    rng = np.random.default_rng(5)
    img = np.where(fg, 0.55 + 0.2 * np.sin(xx / 6.0) * np.cos(yy / 9.0) + 0.02 * rng.standard_normal((N, N)), 0.0)
    return img.astype(np.float32), fg


MAKERS = {
    "perlin": lambda rng: RandPerlinAnomaly(rng),
    "perlin_tex": lambda rng: RandPerlinAnomaly(rng, texture_source=[np.random.default_rng(9).random((50, 70, 3))]),
    "cutpaste": lambda rng: RandCutPaste(rng),
    "lesion": lambda rng: RandLesion(rng),
}


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("rgb", [False, True])
def test_consistent_and_deterministic(name, rgb):
    img, fg = head_image()
    if rgb:
        img = np.repeat(img[..., None], 3, -1)
    runs = [MAKERS[name](np.random.default_rng(s))(img, fg) for s in (1, 1, 2)]
    (a, ma), (b, mb), (c, mc) = runs
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert not np.array_equal(ma, mc)
    for out, mask in runs[:1] + runs[2:]:
        assert out.shape == img.shape and out.dtype == np.float32
        assert mask.shape == (N, N) and mask.dtype == bool and mask.any()
        assert not (mask & ~fg).any()  # only inside the foreground
        changed = out != img if out.ndim == 2 else (out != img).any(-1)
        assert not (changed & ~mask).any()  # nothing changes outside the mask
        assert changed[mask].mean() > 0.5
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_lesion_mass_effect_and_area():
    img, fg = head_image()
    t = RandLesion(np.random.default_rng(0), LesionConfig(mass_effect_p=1.0))
    for _ in range(5):
        out, mask = t(img, fg)
        frac = mask.sum() / fg.sum()
        assert 0.01 < frac < 0.3
        assert np.abs(out - img)[mask].mean() > 0.05  # visible
    auto_out, auto_mask = RandLesion(np.random.default_rng(0))(img)  # foreground found from the image
    assert auto_mask.any() and not (auto_mask & ~fg).any()


def test_perlin_range_and_odd_shapes():
    p = perlin_2d((37, 53), (3, 5), np.random.default_rng(0))
    assert p.shape == (37, 53) and p.dtype == np.float32
    assert -1.0 < p.min() < 0 < p.max() < 1.0 and p.std() > 0.05


def test_empty_foreground_gives_empty_mask():
    img, _ = head_image()
    for make in MAKERS.values():
        out, mask = make(np.random.default_rng(0))(img, np.zeros((N, N), bool))
        assert not mask.any() and np.array_equal(out, img)

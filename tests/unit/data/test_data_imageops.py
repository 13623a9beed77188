"""Image helpers: colour conversion, resizing, PNG round trips."""

import numpy as np

from adcore.data.decode import decode_image, decode_path
from adcore.data.imageops import encode_png, resize, resize_mask, save_mask_png, save_png, to_gray, to_rgb


def test_gray_rgb_round_trip():
    g = np.random.default_rng(0).random((8, 9)).astype(np.float32)
    rgb = to_rgb(g)
    assert rgb.shape == (8, 9, 3)
    np.testing.assert_allclose(to_gray(rgb), g, atol=1e-6)


def test_resize_bilinear_and_nearest():
    x = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (8, 1))
    y = resize(x, (4, 32))
    assert y.shape == (4, 32) and np.all(np.diff(y[0]) >= -1e-6)  # monotone ramp stays monotone
    assert resize(to_rgb(x), (5, 6)).shape == (5, 6, 3)
    m = np.zeros((10, 10), bool)
    m[:5] = True
    r = resize_mask(m, (20, 7))
    assert r.dtype == bool and r[:10].all() and not r[10:].any()


def test_png_round_trips(tmp_path):
    x = np.random.default_rng(1).random((12, 10)).astype(np.float32)
    save_png(tmp_path / "a" / "x.png", x)
    np.testing.assert_allclose(decode_path(tmp_path / "a" / "x.png")[0].pixels, x, atol=0.5 / 255 + 1e-6)
    m = x > 0.5
    save_mask_png(tmp_path / "m.png", m)
    np.testing.assert_array_equal(decode_path(tmp_path / "m.png")[0].pixels > 0.5, m)
    np.testing.assert_array_equal(decode_image(encode_png(m), "m.png")[0].pixels > 0.5, m)

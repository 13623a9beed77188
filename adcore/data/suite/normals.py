"""Normal images of the evaluation suite, each source a real image shipped offline.

A source gives ``base(size) -> (image, foreground)`` (cached: the real image at the suite's size, and
where lesions may go) and ``acquire(rng, image)`` (the per-image acquisition: exposure, colour, blur,
noise). A normal image is a random geometric variation of the base, then acquired; lesions are painted
between the two, so they pass through the same acquisition as the tissue around them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from adcore.data.imageops import resize

_HEAD_CT_FILE = "693_UNCI.dcm"  # pydicom-data: axial head CT, 512 x 512
_CT_WINDOW = (40.0, 120.0)  # HU centre / width: a brain window, grey and white matter apart
_RETINA_LEVEL = 0.08  # fundus photo: the dark surround is below this grey level
_CROP = (0.35, 0.55)  # pathology: crop side / tile side (a 512 px tile gives 180-280 px fields)


def _field(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    return ndimage.zoom(rng.standard_normal((cells, cells)), size / cells, order=3)[:size, :size]


def rand_warp(rng: np.random.Generator, image: np.ndarray, fg: np.ndarray, angle=10.0, scale=0.1, elastic=3.0):
    """Random affine (degrees, relative scale) plus a smooth elastic warp of image ([H, W] or [H, W, 3]) and mask."""
    n = image.shape[0]
    a = np.deg2rad(rng.uniform(-angle, angle))
    s = rng.uniform(1 - scale, 1 + scale)
    shift = rng.uniform(-0.04, 0.04, size=2) * n
    e = rng.uniform(1.0, elastic)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) - (n - 1) / 2
    cos, sin = np.cos(a) / s, np.sin(a) / s
    sy = cos * yy - sin * xx + (n - 1) / 2 + shift[0] + e * _field(rng, n)
    sx = sin * yy + cos * xx + (n - 1) / 2 + shift[1] + e * _field(rng, n)

    def warp(x):
        return ndimage.map_coordinates(x, [sy, sx], order=1, mode="nearest")

    out = np.stack([warp(image[..., c]) for c in range(3)], -1) if image.ndim == 3 else warp(image)
    return out.astype(np.float32), warp(fg.astype(np.float32)) > 0.5


def _noise(rng: np.random.Generator, image: np.ndarray, sigma: tuple[float, float]) -> np.ndarray:
    out = image + rng.uniform(*sigma) * rng.standard_normal(image.shape)
    return np.clip(out, 0, 1).astype(np.float32)


@dataclass(frozen=True)
class Source:
    """A real image and how normal variations of it are drawn."""

    base: Callable[[int], tuple[np.ndarray, np.ndarray]]  # size -> (image, foreground)
    acquire: Callable[[np.random.Generator, np.ndarray], np.ndarray]
    vary: Callable = rand_warp  # (rng, image, foreground) -> the same, a new pose

    def normal(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        image, fg = self.base(size)
        return self.vary(rng, image, fg)


# --- brain MRI (nilearn MNI152 T1 template) and chest radiograph (pydicom-data), the demos' sources ---


def _brain_base(size: int):
    from adcore.data.demo import _slices

    images, masks = _slices(size)
    mid = len(images) // 2
    return images[mid], masks[mid]


def _brain_vary(rng, image, fg):
    from adcore.data.demo import _slices

    images, masks = _slices(image.shape[0])
    z = int(rng.integers(len(images)))  # any slice of the central slab
    return rand_warp(rng, images[z], masks[z])


def _brain_acquire(rng, image):
    from adcore.data.demo import rand_intensity

    return rand_intensity(rng, image)


def _chest_base(size: int):
    from adcore.data.demo_chest import _base

    return _base(size)


def _chest_acquire(rng, image):
    from adcore.data.demo_chest import rand_exposure

    return rand_exposure(rng, image)


# --- head CT (pydicom-data 693_UNCI) ---


@lru_cache(maxsize=4)
def _ct_base(size: int):
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(_HEAD_CT_FILE)
    if path is None:
        raise FileNotFoundError(f"{_HEAD_CT_FILE} not found: install pydicom-data (offline test files)")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    centre, width = _CT_WINDOW
    image = np.clip((hu - centre + width / 2) / width, 0, 1)
    inside = ndimage.binary_fill_holes(ndimage.binary_closing(hu > 300, iterations=3))  # within the skull
    brain = ndimage.binary_erosion(inside & (hu < 100) & (hu > -20), iterations=6)
    image = resize(image, (size, size))
    brain = resize(brain.astype(np.float32), (size, size)) > 0.5
    return image.astype(np.float32), brain


def _ct_acquire(rng, image):
    out = np.clip((image - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.05, 0.05), 0, 1)  # window jitter
    out = ndimage.gaussian_filter(out, rng.uniform(0.0, 0.7))  # reconstruction kernel
    return _noise(rng, out, (0.01, 0.03))


# --- retinal fundus photograph (scikit-image retina, CC0) ---


@lru_cache(maxsize=4)
def _retina_base(size: int):
    from skimage import data

    rgb = data.retina().astype(np.float32) / 255.0
    image = resize(rgb, (size, size))
    disc = ndimage.binary_erosion(image.mean(-1) > _RETINA_LEVEL, iterations=max(size // 32, 1))
    return np.clip(image, 0, 1).astype(np.float32), disc


def _retina_acquire(rng, image):
    out = image ** rng.uniform(0.85, 1.15) * rng.uniform(0.9, 1.1, size=3)  # exposure, white balance
    n = image.shape[0]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n - 0.5
    out = out * (1 - rng.uniform(0.0, 0.3) * (yy**2 + xx**2))[..., None]  # vignetting
    out = ndimage.gaussian_filter(out, (rng.uniform(0, 0.8),) * 2 + (0,))
    return _noise(rng, out, (0.005, 0.02))


# --- pathology tile (scikit-image immunohistochemistry, CC0) ---


@lru_cache(maxsize=1)
def _tile() -> np.ndarray:
    from skimage import data

    return data.immunohistochemistry().astype(np.float32) / 255.0


def _pathology_base(size: int):
    tile = _tile()
    return resize(tile, (size, size)).astype(np.float32), np.ones((size, size), bool)


def _pathology_vary(rng, image, fg):
    """A random field of the tile: crop, quarter turn, flip (tissue has no up)."""
    tile = _tile()
    n, side = tile.shape[0], int(rng.uniform(*_CROP) * tile.shape[0])
    y, x = (int(v) for v in rng.integers(0, n - side + 1, size=2))
    crop = np.rot90(tile[y : y + side, x : x + side], int(rng.integers(4)))
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    size = image.shape[0]
    return resize(np.ascontiguousarray(crop), (size, size)).astype(np.float32), np.ones((size, size), bool)


def _pathology_acquire(rng, image):
    stain = rng.uniform(0.9, 1.1, size=3)  # stain and scanner colour variation
    out = (image - 0.5) * rng.uniform(0.9, 1.1) + 0.5
    return _noise(rng, np.clip(out * stain, 0, 1), (0.005, 0.015))


SOURCES = {
    "brain": Source(_brain_base, _brain_acquire, _brain_vary),
    "chest": Source(_chest_base, _chest_acquire),
    "head_ct": Source(_ct_base, _ct_acquire),
    "retina": Source(_retina_base, _retina_acquire),
    "pathology": Source(_pathology_base, _pathology_acquire, _pathology_vary),
}

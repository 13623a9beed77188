"""Smooth intensity anomalies for training (fusion extension, docs/models/fusion.md).

Same contract as :mod:`adcore.data.synth`: ``t(image, foreground=None) -> (image_aug, mask)``.
The DRAEM-style makers there paint grainy textures or displaced anatomy; lesions in MRI and CT
are mostly a smooth change of intensity with soft edges. This maker changes the intensity inside
a soft-edged elliptical blob, brighter or darker by a visible amount (no near-invisible sample is
labelled anomalous). It is independent of the demo's lesion generator (``adcore.data.demo`` /
``synth.paint_lesion``), which stays out of training.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from adcore.data.synth import RandCutPaste, RandPerlinAnomaly

_MAX_TRIES = 8  # redraws before giving up on a blob inside a small foreground


class RandSmoothIntensity:
    """A soft elliptical blob, its pixels shifted by ``+-amplitude`` with a smooth falloff.

    The mask is where the falloff is at least half (and the change visible); the faint rim of the
    ramp just outside it is changed too (by less than half the amplitude), as a lesion's edge is.

    Args:
        rng: Seeded generator; the only source of randomness.
        radius: Blob semi-axes as a share of the image side (uniform in the range).
        amplitude: Intensity change at the blob's centre (sign drawn at random).
        edge: Width of the soft edge as a share of the radius.
    """

    def __init__(self, rng: np.random.Generator, *, radius=(0.05, 0.18), amplitude=(0.15, 0.5), edge: float = 0.3):
        self.rng, self.radius, self.amplitude, self.edge = rng, radius, amplitude, edge

    def _alpha(self, shape: tuple[int, int], fg: np.ndarray) -> np.ndarray:
        h, w = shape
        ys, xs = np.nonzero(fg)
        i = int(self.rng.integers(len(ys)))
        cy, cx = ys[i], xs[i]
        a, b = (self.rng.uniform(*self.radius, size=2) * min(h, w)).clip(2.0)
        t = self.rng.uniform(0, np.pi)
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        u = ((yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)) / a
        v = (-(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)) / b
        noise = ndimage.gaussian_filter(self.rng.standard_normal(shape).astype(np.float32), 0.5 * min(a, b))
        noise /= max(float(noise.std()), 1e-6)
        dist = np.sqrt(u * u + v * v) * (1 + 0.15 * noise)  # lobulated, not a perfect ellipse
        return np.clip((1 - dist) / self.edge + 0.5, 0, 1) * fg  # 1 inside, soft ramp around dist = 1

    def __call__(self, image: np.ndarray, foreground=None):
        image = np.asarray(image, dtype=np.float32)
        h, w = image.shape[:2]
        fg = np.ones((h, w), bool) if foreground is None else np.asarray(foreground, bool)
        if not fg.any():
            return image.copy(), np.zeros((h, w), bool)
        for _ in range(_MAX_TRIES):
            alpha = self._alpha((h, w), fg)
            mask = alpha >= 0.5
            if mask.any():
                break
        if not mask.any():
            return image.copy(), mask
        delta = self.rng.choice([-1.0, 1.0]) * self.rng.uniform(*self.amplitude)
        shift = (delta * alpha).astype(np.float32)
        out = np.clip(image + (shift[..., None] if image.ndim == 3 else shift), 0, 1)
        changed = np.abs(out - image).max(-1) if image.ndim == 3 else np.abs(out - image)
        mask &= changed >= 0.05  # clipped away (e.g. brightening white): not an anomaly there
        return out.astype(np.float32), mask


def smooth_makers(rng: np.random.Generator, others: list[np.ndarray]) -> list:
    """Half smooth intensity blobs, half the default DRAEM-style makers (textures, foreign anatomy, CutPaste)."""
    smooth = RandSmoothIntensity(rng)
    textures = [RandPerlinAnomaly(rng), RandPerlinAnomaly(rng, texture_source=others), RandCutPaste(rng)]
    return [smooth, smooth, smooth, *textures]

"""Lesion kinds of the evaluation suite: an irregular blob whose intensity (or colour) shifts by a
sampled contrast, ramped in from its border. Pixels outside the mask are never changed.

A kind's ``contrast`` is the peak shift in display units ([0, 1]): visible kinds shift by 0.2-0.5,
faint ones by 0.04-0.1, about the normal images' own variation, so they test sensitivity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from adcore.data.synth import LesionConfig, foci_mask, lesion_mask


@dataclass(frozen=True)
class LesionKind:
    """One lesion kind: shape, size and how far it moves the pixels (sampled uniformly)."""

    contrast: tuple[float, float]  # peak shift in display units; the sign is the kind's (darker or brighter)
    area_frac: tuple[float, float] = (0.02, 0.08)  # lesion area / foreground area
    irregularity: tuple[float, float] = (0.1, 0.4)  # 0: round; larger: lobulated
    edge_frac: tuple[float, float] = (0.15, 0.4)  # soft-edge width as a share of the radius
    texture: float = 0.15  # internal heterogeneity, relative to the shift
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)  # RGB direction of the shift (grey images: its mean)
    n_foci: int = 1  # >1: several small blobs (e.g. punctate haemorrhages)

    @property
    def faint(self) -> bool:
        return max(abs(c) for c in self.contrast) <= FAINT_MAX


FAINT_MAX = 0.12  # kinds whose largest shift is at most this are "faint"


def _grain(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    g = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return g / max(float(g.std()), 1e-6)


def paint(rng: np.random.Generator, image: np.ndarray, foreground: np.ndarray, kind: LesionKind):
    """``image`` with one lesion of ``kind`` inside ``foreground``; returns (image, mask)."""
    if kind.n_foci > 1:
        cfg = LesionConfig(area_frac=kind.area_frac, irregularity=kind.irregularity, n_foci=(kind.n_foci, kind.n_foci))
        mask, _, radius = foci_mask(rng, foreground, cfg)
    else:
        mask, _, radius = lesion_mask(rng, foreground, kind.area_frac, kind.irregularity)
    depth = ndimage.distance_transform_edt(mask)
    edge = max(radius * rng.uniform(*kind.edge_frac), 1.0)
    alpha = ndimage.gaussian_filter(np.clip(depth / edge, 0.0, 1.0), edge / 2) * mask  # 0 outside the mask
    shift = rng.uniform(*kind.contrast) * (1 + kind.texture * _grain(rng, mask.shape, max(radius / 4, 1.0)))
    delta = (alpha * shift).astype(np.float32)  # [H, W]
    colour = np.asarray(kind.colour, np.float32)
    out = image + delta[..., None] * colour if image.ndim == 3 else image + delta * float(colour.mean())
    out = np.clip(out, 0.0, 1.0)
    return np.where(mask[..., None] if image.ndim == 3 else mask, out, image).astype(np.float32), mask

"""Patch scores -> one image score (the reductions the methods' papers use), and map smoothing."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def reduce_patches(per_patch: np.ndarray, how: str, topk_fraction: float = 0.1) -> np.ndarray:
    """[B, N] -> [B]: ``mean`` (fusion paper), ``topk`` (mean of the top share) or ``max`` (PatchCore)."""
    if how == "mean":
        return per_patch.mean(1)
    if how == "max":
        return per_patch.max(1)
    if how == "topk":
        k = max(1, int(per_patch.shape[1] * topk_fraction))
        return np.sort(per_patch, axis=1)[:, -k:].mean(1)
    raise ValueError(f"unknown reduction {how!r}")


def smooth_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """[B, H, W] maps each smoothed with a Gaussian of ``sigma`` cells (PatchCore's step; unchanged when 0)."""
    if sigma <= 0:
        return maps
    return np.stack([ndimage.gaussian_filter(m, sigma, mode="nearest") for m in maps])

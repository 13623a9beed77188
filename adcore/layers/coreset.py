"""Greedy k-center coreset selection (PatchCore, Roth et al. 2022)."""

from __future__ import annotations

import numpy as np
import torch


def greedy_coreset(features: np.ndarray, n_select: int, projection_dim: int = 128, seed: int = 0) -> np.ndarray:
    """Indices of ``n_select`` rows chosen by iterative farthest-point selection.

    Distances are computed on a random Johnson-Lindenstrauss projection to
    ``projection_dim`` dimensions, as in the PatchCore paper, which keeps the
    selection cheap on wide features.
    """
    n = len(features)
    if n_select >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if x.shape[1] > projection_dim:
        proj = torch.from_numpy(rng.standard_normal((x.shape[1], projection_dim)).astype(np.float32))
        x = x @ proj / projection_dim**0.5
    selected = np.empty(n_select, dtype=np.int64)
    selected[0] = int(rng.integers(n))
    min_dist = torch.cdist(x, x[selected[0]][None]).squeeze(1)  # [N]
    for i in range(1, n_select):
        selected[i] = int(torch.argmax(min_dist))
        min_dist = torch.minimum(min_dist, torch.cdist(x, x[selected[i]][None]).squeeze(1))
    return selected

"""Greedy k-center coreset selection (PatchCore, Roth et al. 2022)."""

from __future__ import annotations

import numpy as np
import torch


def greedy_coreset(
    features: np.ndarray, n_select: int, projection_dim: int = 128, seed: int = 0, device: str = "cpu"
) -> np.ndarray:
    """Indices of ``n_select`` rows chosen by iterative farthest-point selection.

    Distances are computed on a random Johnson-Lindenstrauss projection to
    ``projection_dim`` dimensions, as in the PatchCore paper, which keeps the
    selection cheap on wide features. ``device`` "cuda" runs the selection on the GPU
    (the same picks up to float rounding).
    """
    n = len(features)
    if n_select >= n:
        return np.arange(n)
    if device != "cpu":
        return _greedy(features, n_select, projection_dim, seed, device)
    # One small mat-vec per pick: a single thread avoids OpenMP barrier costs that dominate at this size.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _greedy(features, n_select, projection_dim, seed)
    finally:
        torch.set_num_threads(threads)


def _greedy(features: np.ndarray, n_select: int, projection_dim: int, seed: int, device: str = "cpu") -> np.ndarray:
    n = len(features)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    if x.shape[1] > projection_dim:
        proj = torch.from_numpy(rng.standard_normal((x.shape[1], projection_dim)).astype(np.float32)).to(device)
        x = x @ proj / projection_dim**0.5
    sq = (x * x).sum(1)  # [N]; squared distances as |x|^2 - 2 x.c + |c|^2 (one mat-vec per pick)
    selected = np.empty(n_select, dtype=np.int64)
    selected[0] = int(rng.integers(n))
    min_d2 = sq - 2 * (x @ x[selected[0]]) + sq[selected[0]]
    for i in range(1, n_select):
        j = int(torch.argmax(min_d2))
        selected[i] = j
        torch.minimum(min_d2, sq - 2 * (x @ x[j]) + sq[j], out=min_d2)
    return selected

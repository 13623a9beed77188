"""Greedy k-center coreset selection (PatchCore, Roth et al. 2022)."""

from __future__ import annotations

import numpy as np
import torch

# Below this many projected values (rows x projection_dim) one pick's mat-vec is too small to share
# between threads: OpenMP barrier costs would dominate, so it runs on one. Above it, on all of them.
THREADED_MIN_VALUES = 1 << 21


def coreset_size(n_rows: int, ratio: float, max_rows: int | None, cpu_max_rows: int) -> tuple[int, str]:
    """Rows a bank keeps of ``n_rows`` and the device that selects them: ``ratio`` of the rows, at
    most ``max_rows`` when set, else unbounded on a GPU and at most ``cpu_max_rows`` on the CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cap = max_rows if max_rows is not None else (None if device == "cuda" else cpu_max_rows)
    n = max(1, int(n_rows * ratio))
    return (n if cap is None else min(cap, n)), device


def greedy_coreset(
    features: np.ndarray,
    n_select: int,
    projection_dim: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Indices of ``n_select`` rows chosen by iterative farthest-point selection.

    Distances are computed on a random Johnson-Lindenstrauss projection to
    ``projection_dim`` dimensions, as in the PatchCore paper, which keeps the
    selection cheap on wide features. ``device``: where the picks run (default: the current CUDA
    device when torch sees one, else the CPU, multi-threaded for large inputs).
    """
    n = len(features)
    if n_select >= n:
        return np.arange(n)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and n * min(projection_dim, features.shape[1]) < THREADED_MIN_VALUES:
        torch.set_num_threads(1)
    try:
        return _greedy(features, n_select, projection_dim, seed, device)
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def _greedy(features: np.ndarray, n_select: int, projection_dim: int, seed: int, device: torch.device) -> np.ndarray:
    n = len(features)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    if x.shape[1] > projection_dim:
        proj = torch.from_numpy(rng.standard_normal((x.shape[1], projection_dim)).astype(np.float32))
        x = x @ proj / projection_dim**0.5  # [N, P], projected on the CPU: the full rows never go to the GPU
    x = x.to(device)
    sq = (x * x).sum(1)  # [N]; squared distances as |x|^2 - 2 x.c + |c|^2 (one mat-vec per pick)
    first = int(rng.integers(n))
    picks = torch.empty(n_select, dtype=torch.int64, device=device)  # on the device: no sync per pick
    picks[0] = first
    min_d2 = sq - 2 * (x @ x[first]) + sq[first]
    for i in range(1, n_select):
        j = torch.argmax(min_d2)
        picks[i] = j
        torch.minimum(min_d2, sq - 2 * (x @ x[j]) + sq[j], out=min_d2)
    return picks.cpu().numpy()

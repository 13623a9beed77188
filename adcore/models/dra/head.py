"""DRA's pipeline head: the network's own score and map (DRA has no FAISS stage to match against)."""

from __future__ import annotations

import numpy as np


class DRAHead:
    """Passes the network's normalised score and patch map through; nothing to save."""

    def __init__(self, use_gpu: bool | None = None):
        del use_gpu  # no index

    @classmethod
    def from_saved(cls, config: dict, arrays: dict[str, np.ndarray], use_gpu: bool | None = None) -> DRAHead:
        return cls(use_gpu)

    def config(self) -> dict:
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    def __call__(self, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(out["score"], np.float32), np.asarray(out["anomaly_map"], np.float32)

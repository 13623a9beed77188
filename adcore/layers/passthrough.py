"""A pipeline head for families whose network scores by itself: its score and map pass through."""

from __future__ import annotations

import numpy as np


class PassThroughHead:
    """No FAISS stage, nothing to save: ``(out["score"], out["anomaly_map"])`` as the raw values."""

    def __init__(self, use_gpu: bool | None = None):
        del use_gpu  # no index

    @classmethod
    def from_saved(cls, config: dict, arrays: dict[str, np.ndarray], use_gpu: bool | None = None):
        return cls(use_gpu)

    def config(self) -> dict:
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    def __call__(self, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(out["score"], np.float32), np.asarray(out["anomaly_map"], np.float32)

"""EntroAD's pipeline head: the network's own score and map.

Zero-shot on an unseen domain means nothing of the target domain is matched against, so there is
no memory bank or centroid to search: the head passes the network's outputs through.
"""

from __future__ import annotations

import numpy as np


class EntroADHead:
    """Passes the network's score and patch map through; nothing to save."""

    def __init__(self, use_gpu: bool | None = None):
        del use_gpu  # no index

    @classmethod
    def from_saved(cls, config: dict, arrays: dict[str, np.ndarray], use_gpu: bool | None = None) -> EntroADHead:
        return cls(use_gpu)

    def config(self) -> dict:
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    def __call__(self, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(out["score"], np.float32), np.asarray(out["anomaly_map"], np.float32)

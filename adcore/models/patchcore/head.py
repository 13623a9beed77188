"""PatchCore's FAISS stage: nearest-neighbour distance to the memory bank."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from adcore.index import PatchIndex
from adcore.layers.reduce import reduce_patches


@dataclass
class MemoryBankHeadConfig:
    k: int = 1  # neighbours averaged per patch
    reduction: str = "max"  # PatchCore: image score = the most anomalous patch


class MemoryBankHead:
    """A patch's anomaly is its L2 distance to the nearest memory-bank rows.

    Unlike the PatchCore paper, the map is not Gaussian-smoothed before the image
    score is taken, and the image score is not reweighted by the neighbours' density.
    """

    def __init__(self, bank: np.ndarray, cfg: MemoryBankHeadConfig | None = None, use_gpu: bool | None = None):
        self.cfg = cfg or MemoryBankHeadConfig()
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.index = PatchIndex(self.bank, metric="l2", use_gpu=use_gpu)

    @classmethod
    def from_saved(cls, config: dict, arrays: dict[str, np.ndarray], use_gpu: bool | None = None) -> MemoryBankHead:
        fields = MemoryBankHeadConfig.__dataclass_fields__
        return cls(
            arrays["memory_bank"], MemoryBankHeadConfig(**{k: v for k, v in config.items() if k in fields}), use_gpu
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {"memory_bank": self.bank}

    def config(self) -> dict:
        return asdict(self.cfg)

    def __call__(self, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        emb = out["patch_embeddings"]  # [B, g*g, E]
        b, n, e = emb.shape
        d2, _ = self.index.search(emb.reshape(b * n, e), k=self.cfg.k)
        dist = np.sqrt(np.maximum(d2, 0)).mean(1).reshape(b, n)
        amap = dist.reshape(out["anomaly_map"].shape)  # [B, gh, gw]
        return reduce_patches(dist, self.cfg.reduction).astype(np.float32), amap.astype(np.float32)

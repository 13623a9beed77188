"""PatchCore's FAISS stage: nearest-neighbour distance to the memory bank."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from adcore.index import PatchIndex
from adcore.layers.density import density_weights
from adcore.layers.reduce import reduce_patches, smooth_maps


@dataclass
class MemoryBankHeadConfig:
    """The defaults are the head of artifacts saved before the paper's two steps existed (both off);
    ``fit_memory_bank`` writes the model config's values (paper defaults on)."""

    k: int = 1  # neighbours averaged per patch
    reduction: str = "max"  # PatchCore: image score = the most anomalous patch
    map_sigma: float = 0.0  # Gaussian smoothing of the map, in patch-grid cells (paper: 4 px at input size)
    reweight_k: int = 0  # paper eq. 7: reweight the image score over this many bank neighbours (official: 9)


class MemoryBankHead:
    """A patch's anomaly is its L2 distance to the nearest memory-bank rows (Roth et al. 2022).

    As the paper does, when the config says so: the map is smoothed with a Gaussian (``map_sigma``;
    the image score comes from the raw patch distances, as in the official code), and the image score
    ``s*`` of the most anomalous patch ``m`` is reweighted by how dense the bank is around its
    nearest bank row ``m*``: ``s = (1 - exp||m - m*|| / sum_{n in N_b(m*)} exp||m - n||) * s*``, where
    ``N_b(m*)`` are the ``reweight_k`` bank rows nearest ``m*`` (``m*`` itself first). When ``m*`` is
    itself a rare normal pattern far from the rest of the bank the weight nears 1; in a dense region
    of the bank it falls towards ``1 - 1/reweight_k``.
    """

    @property
    def device_embeddings(self) -> bool:
        """Takes ``patch_embeddings`` as a tensor on its index's GPU (searched there, never copied to the host)."""
        return self.index.device == "cuda"

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
        emb = out["patch_embeddings"]  # [B, g*g, E]: NumPy, or a tensor on the index's GPU (device_embeddings)
        b, n, e = emb.shape
        d2, ids = self.index.search(emb.reshape(b * n, e), k=self.cfg.k)
        dist = np.sqrt(np.maximum(d2, 0)).mean(1).reshape(b, n)
        amap = dist.reshape(out["anomaly_map"].shape)  # [B, gh, gw]
        amap = smooth_maps(amap, self.cfg.map_sigma)
        scores = reduce_patches(dist, self.cfg.reduction)
        if self.cfg.reweight_k > 0 and self.cfg.reduction == "max":
            rows, worst = np.arange(b), dist.argmax(1)  # [B]
            nearest = ids.reshape(b, n, -1)[rows, worst, 0]
            worst_emb = emb[rows, worst]  # [B, E]
            if not isinstance(worst_emb, np.ndarray):  # a device tensor: these B rows alone come to the host
                worst_emb = worst_emb.cpu().numpy()
            scores = scores * density_weights(self.index, self.bank, worst_emb, nearest, self.cfg.reweight_k)
        return scores.astype(np.float32), amap.astype(np.float32)

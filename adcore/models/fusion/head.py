"""The fusion model's FAISS stage: few-shot matching against VAE centroids (papers.md section 1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from adcore.index import PatchIndex
from adcore.layers.reduce import reduce_patches


@dataclass
class CentroidHeadConfig:
    alpha_few: float = 0.15  # paper: weight of the few-shot similarity in map and score
    temperature: float = 20.0  # sharpness of the normal-vs-anomalous similarity contrast
    reduction: str = "mean"
    topk_fraction: float = 0.1


class CentroidHead:
    """Few-shot matching against VAE centroids of each class.

    For every patch, s_n and s_a are its best cosine similarities to the normal
    and anomalous centroids; the few-shot anomaly probability is
    sigmoid(temperature * (s_a - s_n)). The paper's "similarity matrix summed
    over patches and normalised" becomes the reduction of these probabilities;
    both are blended with the base model with weight ``alpha_few``.
    """

    def __init__(self, centroids: np.ndarray, cfg: CentroidHeadConfig | None = None, use_gpu: bool | None = None):
        if centroids.ndim != 3 or centroids.shape[0] != 2:
            raise ValueError(f"centroids must be [2, K, E] (normal, anomalous), got {centroids.shape}")
        self.cfg = cfg or CentroidHeadConfig()
        self.centroids = centroids.astype(np.float32)
        self.n_per_class = centroids.shape[1]
        self.index = PatchIndex(self.centroids.reshape(2 * self.n_per_class, -1), metric="cosine", use_gpu=use_gpu)

    @classmethod
    def from_saved(cls, config: dict, arrays: dict[str, np.ndarray], use_gpu: bool | None = None) -> CentroidHead:
        fields = CentroidHeadConfig.__dataclass_fields__
        return cls(arrays["centroids"], CentroidHeadConfig(**{k: v for k, v in config.items() if k in fields}), use_gpu)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids}

    def config(self) -> dict:
        return asdict(self.cfg)

    def few_shot_map(self, embeddings: np.ndarray) -> np.ndarray:
        """[B, N, E] -> [B, N] few-shot anomaly probability."""
        b, n, e = embeddings.shape
        total = 2 * self.n_per_class
        sims, ids = self.index.search(embeddings.reshape(b * n, e), k=total)  # sorted, every centroid
        is_anomalous = ids >= self.n_per_class
        s_a = np.where(is_anomalous, sims, -np.inf).max(1)
        s_n = np.where(~is_anomalous, sims, -np.inf).max(1)
        logits = self.cfg.temperature * (s_a - s_n)
        return (1.0 / (1.0 + np.exp(-logits))).reshape(b, n).astype(np.float32)

    def __call__(self, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Network outputs -> (raw image score [B], raw map [B, g, g])."""
        base_map = out["anomaly_map"]  # [B, gh, gw]
        few = self.few_shot_map(out["patch_embeddings"])  # [B, gh*gw]
        a = self.cfg.alpha_few
        amap = (1 - a) * base_map + a * few.reshape(base_map.shape)
        score = (1 - a) * out["score"] + a * reduce_patches(few, self.cfg.reduction, self.cfg.topk_fraction)
        return score.astype(np.float32), amap.astype(np.float32)

"""The FAISS stage: patch embeddings matched against centroids or a memory bank.

This stage stays outside the exported network (and outside Triton): the
network returns patch embeddings, and a head turns them into the final raw
anomaly map and image score. Both heads run on :class:`adcore.index.PatchIndex`,
which moves to the GPU when FAISS sees one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from adcore.index import PatchIndex


def reduce_patches(per_patch: np.ndarray, how: str, topk_fraction: float = 0.1) -> np.ndarray:
    """[B, N] -> [B]: ``mean`` (paper), ``topk`` (mean of the top share) or ``max`` (PatchCore)."""
    if how == "mean":
        return per_patch.mean(1)
    if how == "max":
        return per_patch.max(1)
    if how == "topk":
        k = max(1, int(per_patch.shape[1] * topk_fraction))
        return np.sort(per_patch, axis=1)[:, -k:].mean(1)
    raise ValueError(f"unknown reduction {how!r}")


@dataclass
class CentroidHeadConfig:
    alpha_few: float = 0.15  # paper: weight of the few-shot similarity in map and score
    temperature: float = 20.0  # sharpness of the normal-vs-anomalous similarity contrast
    reduction: str = "mean"
    topk_fraction: float = 0.1


class CentroidHead:
    """Few-shot matching against VAE centroids of each class (papers.md section 1).

    For every patch, s_n and s_a are its best cosine similarities to the normal
    and anomalous centroids; the few-shot anomaly probability is
    sigmoid(temperature * (s_a - s_n)). The paper's "similarity matrix summed
    over patches and normalised" becomes the reduction of these probabilities;
    both are blended with the base model with weight ``alpha_few``.
    """

    kind = "centroids"

    def __init__(self, centroids: np.ndarray, cfg: CentroidHeadConfig | None = None, use_gpu: bool | None = None):
        if centroids.ndim != 3 or centroids.shape[0] != 2:
            raise ValueError(f"centroids must be [2, K, E] (normal, anomalous), got {centroids.shape}")
        self.cfg = cfg or CentroidHeadConfig()
        self.centroids = centroids.astype(np.float32)
        k = centroids.shape[1]
        self.n_per_class = k
        self.index = PatchIndex(self.centroids.reshape(2 * k, -1), metric="cosine", use_gpu=use_gpu)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids}

    def config(self) -> dict:
        return {"kind": self.kind, **asdict(self.cfg)}

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


@dataclass
class MemoryBankHeadConfig:
    k: int = 1  # neighbours averaged per patch
    reduction: str = "max"  # PatchCore: image score = the most anomalous patch


class MemoryBankHead:
    """PatchCore scoring: a patch's anomaly is its L2 distance to the nearest memory-bank rows."""

    kind = "memory_bank"

    def __init__(self, bank: np.ndarray, cfg: MemoryBankHeadConfig | None = None, use_gpu: bool | None = None):
        self.cfg = cfg or MemoryBankHeadConfig()
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.index = PatchIndex(self.bank, metric="l2", use_gpu=use_gpu)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"memory_bank": self.bank}

    def config(self) -> dict:
        return {"kind": self.kind, **asdict(self.cfg)}

    def __call__(self, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        emb = out["patch_embeddings"]
        b, n, e = emb.shape
        d2, _ = self.index.search(emb.reshape(b * n, e), k=self.cfg.k)
        dist = np.sqrt(np.maximum(d2, 0)).mean(1).reshape(b, n)
        amap = dist.reshape(out["anomaly_map"].shape)  # [B, gh, gw]
        return reduce_patches(dist, self.cfg.reduction).astype(np.float32), amap.astype(np.float32)


def head_from_config(config: dict, arrays: dict[str, np.ndarray], use_gpu: bool | None = None):
    cfg = {k: v for k, v in config.items() if k != "kind"}
    if config["kind"] == "centroids":
        return CentroidHead(arrays["centroids"], CentroidHeadConfig(**cfg), use_gpu=use_gpu)
    if config["kind"] == "memory_bank":
        return MemoryBankHead(arrays["memory_bank"], MemoryBankHeadConfig(**cfg), use_gpu=use_gpu)
    raise ValueError(f"unknown head kind {config['kind']!r}")

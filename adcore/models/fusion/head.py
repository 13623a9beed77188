"""The fusion model's FAISS stage: few-shot matching against VAE centroids (papers.md section 1).

Extension (docs/models/fusion.md): an optional normal-patch memory, PatchCore's
nearest-neighbour distance on frozen domain-tower features, blended into map and score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from adcore.index import PatchIndex
from adcore.layers.density import density_weights
from adcore.layers.reduce import reduce_patches, smooth_maps


@dataclass
class CentroidHeadConfig:
    alpha_few: float = 0.15  # paper: weight of the few-shot similarity in map and score
    temperature: float = 20.0  # sharpness of the normal-vs-anomalous similarity contrast
    reduction: str = "mean"
    topk_fraction: float = 0.1
    # Extension: normal-patch memory (None / 0 rows: off). Embedding columns from ``centroid_dim`` on
    # are the memory features; a patch's memory probability is sigmoid((d - memory_loc) / memory_scale)
    # with d its L2 distance to the nearest memory row, blended with weight ``memory_weight``.
    centroid_dim: int | None = None  # None: every column is a centroid column (no memory)
    memory_weight: float = 0.0
    memory_loc: float = 0.0  # held-out normal patches' 99th distance percentile (fit)
    memory_scale: float = 1.0  # a quarter of their 99th - 50th percentile spread (fit)
    memory_reduction: str = "max"
    # Extension: PatchCore's eq. 7 on the memory branch's image score (with "max"): the most anomalous
    # patch's distance reweighted by the bank's density around its nearest row (0 = off; official 9).
    memory_reweight_k: int = 0
    # Extension: memory weights the training run may choose between on the validation split
    # (adcore.training.select; [] = keep ``memory_weight``).
    memory_weight_choices: list[float] = field(default_factory=list)
    # Extension: multipliers of ``memory_scale`` chosen between with them ([] = keep the scale). A wider
    # sigmoid keeps more of the distances' order among far patches, a narrower one squashes it.
    memory_scale_choices: list[float] = field(default_factory=list)
    # Extension: Gaussian smoothing of the final map, in patch-grid cells (PatchCore's step; 0 = off).
    map_sigma: float = 0.0
    # With smoothing and a memory bank: True smooths the memory branch's distances before their sigmoid
    # (as PatchCore smooths its distances), the rest of the blend after it; False (artifacts saved before
    # the field) smooths the blended map. Smoothing is linear, so only where the sigmoid sits changes.
    smooth_distances: bool = False


class CentroidHead:
    """Few-shot matching against VAE centroids of each class.

    For every patch, s_n and s_a are its best cosine similarities to the normal
    and anomalous centroids; the few-shot anomaly probability is
    sigmoid(temperature * (s_a - s_n)). The paper's "similarity matrix summed
    over patches and normalised" becomes the reduction of these probabilities;
    both are blended with the base model with weight ``alpha_few``.

    With a ``memory`` bank [M, E_m] (extension), the result is blended once more:
    ``(1 - w) * that + w * memory probability`` in the map, and the same with the
    memory map's ``memory_reduction`` in the score.
    """

    def __init__(
        self,
        centroids: np.ndarray,
        cfg: CentroidHeadConfig | None = None,
        use_gpu: bool | None = None,
        memory: np.ndarray | None = None,
    ):
        if centroids.ndim != 3 or centroids.shape[0] != 2:
            raise ValueError(f"centroids must be [2, K, E] (normal, anomalous), got {centroids.shape}")
        self.cfg = cfg or CentroidHeadConfig()
        self.centroids = centroids.astype(np.float32)
        self.n_per_class = centroids.shape[1]
        self.index = PatchIndex(self.centroids.reshape(2 * self.n_per_class, -1), metric="cosine", use_gpu=use_gpu)
        self.memory = None if memory is None or len(memory) == 0 else np.ascontiguousarray(memory, np.float32)
        if self.memory is not None and self.cfg.centroid_dim is None:
            raise ValueError("a memory bank needs centroid_dim (where the memory columns start)")
        self.memory_index = None if self.memory is None else PatchIndex(self.memory, metric="l2", use_gpu=use_gpu)

    @classmethod
    def from_saved(cls, config: dict, arrays: dict[str, np.ndarray], use_gpu: bool | None = None) -> CentroidHead:
        fields = CentroidHeadConfig.__dataclass_fields__
        cfg = CentroidHeadConfig(**{k: v for k, v in config.items() if k in fields})
        return cls(arrays["centroids"], cfg, use_gpu, memory=arrays.get("normal_memory"))

    def arrays(self) -> dict[str, np.ndarray]:
        if self.memory is None:
            return {"centroids": self.centroids}
        return {"centroids": self.centroids, "normal_memory": self.memory}

    def config(self) -> dict:
        return asdict(self.cfg)

    def validation_choices(self) -> list[dict]:
        """Memory weights (and scales) to choose between on validation, the configured ones first (ties keep
        them)."""
        if self.memory is None or not (self.cfg.memory_weight_choices or self.cfg.memory_scale_choices):
            return []
        weights = [self.cfg.memory_weight, *(w for w in self.cfg.memory_weight_choices if w != self.cfg.memory_weight)]
        if not self.cfg.memory_scale_choices:
            return [{"memory_weight": float(w)} for w in weights]
        scales = [1.0, *(m for m in self.cfg.memory_scale_choices if m != 1.0)]
        base = self.cfg.memory_scale  # every choice names its scale: applying one never leaves another's behind
        return [{"memory_weight": float(w), "memory_scale": float(base * m)} for m in scales for w in weights]

    def validation_prior(self) -> dict | None:
        """The memory branch alone (weight 1), when it is among the choices: the setting the network's part
        must beat on validation by more than noise (adcore.training.select)."""
        # The first weight-1 choice is the configured scale's (validation_choices lists it first).
        return next((c for c in self.validation_choices() if c["memory_weight"] == 1.0), None)

    def apply_choice(self, choice: dict) -> None:
        for key, value in choice.items():
            if key not in CentroidHeadConfig.__dataclass_fields__:
                raise ValueError(f"not a head setting: {key!r}")
            setattr(self.cfg, key, value)

    def few_shot_map(self, embeddings: np.ndarray) -> np.ndarray:
        """[B, N, E] -> [B, N] few-shot anomaly probability."""
        b, n, e = embeddings.shape
        total = 2 * self.n_per_class
        sims, ids = self.index.search(np.ascontiguousarray(embeddings).reshape(b * n, e), k=total)  # every centroid
        is_anomalous = ids >= self.n_per_class
        s_a = np.where(is_anomalous, sims, -np.inf).max(1)
        s_n = np.where(~is_anomalous, sims, -np.inf).max(1)
        logits = self.cfg.temperature * (s_a - s_n)
        return (1.0 / (1.0 + np.exp(-logits))).reshape(b, n).astype(np.float32)

    def memory_distance(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[B, N, E_m] -> L2 distance [B, N] of each patch to its nearest memory row, and that row [B, N]."""
        b, n, e = features.shape
        d2, ids = self.memory_index.search(np.ascontiguousarray(features).reshape(b * n, e), k=1)
        return np.sqrt(np.maximum(d2[:, 0], 0)).reshape(b, n), ids[:, 0].reshape(b, n)

    def memory_score(self, features: np.ndarray, distance: np.ndarray, nearest: np.ndarray) -> np.ndarray:
        """Image score [B] of the memory branch: its reduction, or eq. 7's reweighted maximum."""
        k = self.cfg.memory_reweight_k
        if k <= 0 or self.cfg.memory_reduction != "max":
            return reduce_patches(self.memory_probability(distance), self.cfg.memory_reduction, self.cfg.topk_fraction)
        rows = np.arange(len(distance))
        worst = distance.argmax(1)
        weights = density_weights(self.memory_index, self.memory, features[rows, worst], nearest[rows, worst], k)
        return self.memory_probability(distance[rows, worst] * weights)

    def memory_probability(self, distance: np.ndarray) -> np.ndarray:
        z = (distance - self.cfg.memory_loc) / max(self.cfg.memory_scale, 1e-12)
        return (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).astype(np.float32)

    def __call__(self, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Network outputs -> (raw image score [B], raw map [B, g, g])."""
        base_map = out["anomaly_map"]  # [B, gh, gw]
        emb = out["patch_embeddings"]
        cut = self.cfg.centroid_dim
        few = self.few_shot_map(emb if cut is None else emb[..., :cut])  # [B, gh*gw]
        a = self.cfg.alpha_few
        amap = (1 - a) * base_map + a * few.reshape(base_map.shape)
        score = (1 - a) * out["score"] + a * reduce_patches(few, self.cfg.reduction, self.cfg.topk_fraction)
        first = self.memory is not None and self.cfg.smooth_distances
        if first:  # each part smoothed on its own; the memory branch's before its sigmoid
            amap = smooth_maps(amap, self.cfg.map_sigma)
        if self.memory is not None:
            w = self.cfg.memory_weight
            features = emb[..., cut:]
            distance, nearest = self.memory_distance(features)  # [B, gh*gw]
            dmap = distance.reshape(base_map.shape)
            if first:
                dmap = smooth_maps(dmap, self.cfg.map_sigma)
            amap = (1 - w) * amap + w * self.memory_probability(dmap)
            score = (1 - w) * score + w * self.memory_score(features, distance, nearest)
        if not first:
            amap = smooth_maps(amap, self.cfg.map_sigma)
        return score.astype(np.float32), amap.astype(np.float32)

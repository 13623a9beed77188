"""Build the FAISS-stage head after training: a function call, not an epoch.

Fusion: patch embeddings of normal and (synthetic or real) anomalous patches,
one VAE per class, 16 decoded centroids each (papers.md section 1).
PatchCore: locally aware features of normal images, greedy coreset, memory bank.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from adcore.heads import CentroidHead, CentroidHeadConfig, MemoryBankHead, MemoryBankHeadConfig
from adcore.layers.coreset import greedy_coreset
from adcore.layers.vae import VAEConfig, fit_vae_centroids

log = logging.getLogger("adcore.train")

# Patches per class kept for the VAE: enough for 16 centroids, bounded memory and time.
MAX_PATCHES_PER_CLASS = 20000
# A patch is anomalous when at least this share of its pixels is in the mask, normal when none is.
ANOMALOUS_PATCH_SHARE = 0.5
HEAD_EPOCH = 10_000  # synthesis seed for the head's pass, distinct from training epochs


def _gather(array: np.ndarray, hooks) -> np.ndarray:
    if hooks.world_size > 1 and torch.distributed.is_initialized():
        parts: list = [None] * hooks.world_size
        torch.distributed.all_gather_object(parts, array)
        return np.concatenate(parts)
    return array


def _subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[np.random.default_rng(seed).choice(len(x), n, replace=False)]


@torch.inference_mode()
def _embeddings_by_class(model, batches, anomaly_share: float):
    normal, anomalous = [], []
    saved = batches.anomaly_share
    batches.anomaly_share = anomaly_share
    try:
        for batch in batches.epoch(HEAD_EPOCH):
            out = model(batch.images)
            emb = out.patch_embeddings.float().numpy()  # [B, g*g, E]
            g = model.grid
            share = F.adaptive_avg_pool2d(batch.masks[:, None], g).flatten(1).numpy()  # [B, g*g]
            normal.append(emb[share == 0])
            anomalous.append(emb[share >= ANOMALOUS_PATCH_SHARE])
    finally:
        batches.anomaly_share = saved
    return np.concatenate(normal), np.concatenate(anomalous)


def build_head(model, batches, cfg, hooks):
    if model.head_kind == "centroids":
        normal, anomalous = _embeddings_by_class(model, batches, anomaly_share=1.0)
        normal = _gather(_subsample(normal, MAX_PATCHES_PER_CLASS // hooks.world_size, cfg.seed), hooks)
        anomalous = _gather(_subsample(anomalous, MAX_PATCHES_PER_CLASS // hooks.world_size, cfg.seed), hooks)
        if len(anomalous) == 0:
            raise ValueError("no anomalous patches to fit centroids on (synthetic anomalies produced empty masks)")
        vae = VAEConfig(n_centroids=model.cfg.n_centroids, seed=cfg.seed, epochs=2 if cfg.smoke_test else VAEConfig.epochs)
        centroids = np.stack([fit_vae_centroids(normal, vae), fit_vae_centroids(anomalous, vae)])
        log.info("centroids from %d normal and %d anomalous patches", len(normal), len(anomalous))
        head_cfg = CentroidHeadConfig(
            alpha_few=model.cfg.alpha_few, reduction=model.cfg.score_reduction, topk_fraction=model.cfg.topk_fraction
        )
        return CentroidHead(centroids, head_cfg)
    normal, _ = _embeddings_by_class(model, batches, anomaly_share=0.0)
    pc = model.cfg
    n_select = min(pc.max_bank, max(1, int(len(normal) * pc.coreset_ratio)))
    local = greedy_coreset(normal, max(1, n_select // hooks.world_size), seed=cfg.seed)
    bank = _gather(normal[local], hooks)
    log.info("memory bank: %d of %d patches", len(bank), len(normal) * hooks.world_size)
    return MemoryBankHead(bank, MemoryBankHeadConfig(k=pc.score_k))


"""The fusion head: one VAE per class on patch embeddings, 16 decoded centroids each (papers.md section 1)."""

from __future__ import annotations

import logging

import numpy as np

from adcore.layers.vae import VAEConfig, fit_vae_centroids
from adcore.models.fusion.head import CentroidHead, CentroidHeadConfig

log = logging.getLogger("adcore.train")

# Patches per class kept for the VAE: enough for 16 centroids, bounded memory and time.
MAX_PATCHES_PER_CLASS = 20000
QUICK_VAE_EPOCHS = 2  # smoke tests: the plumbing, not the centroids' quality


def fit_centroids(model, data) -> CentroidHead:
    """Centroids of normal patches and of (synthetic or real) anomalous ones."""
    normal, anomalous = data.patches_by_class(model, anomaly_share=1.0)
    per_rank = MAX_PATCHES_PER_CLASS // data.world_size
    normal = data.gather(data.subsample(normal, per_rank))
    anomalous = data.gather(data.subsample(anomalous, per_rank))
    if len(anomalous) == 0:
        raise ValueError("no anomalous patches to fit centroids on (synthetic anomalies produced empty masks)")
    vae = VAEConfig(n_centroids=model.cfg.n_centroids, seed=data.seed)
    if data.quick:
        vae.epochs = QUICK_VAE_EPOCHS
    centroids = np.stack([fit_vae_centroids(normal, vae), fit_vae_centroids(anomalous, vae)])
    log.info("centroids from %d normal and %d anomalous patches", len(normal), len(anomalous))
    cfg = model.cfg
    head_cfg = CentroidHeadConfig(
        alpha_few=cfg.alpha_few, reduction=cfg.score_reduction, topk_fraction=cfg.topk_fraction
    )
    return CentroidHead(centroids, head_cfg)

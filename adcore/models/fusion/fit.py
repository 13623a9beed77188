"""The fusion head: one VAE per class on patch embeddings, 16 decoded centroids each (papers.md section 1).

Extensions (config fields; docs/models/fusion.md): ``clean_centroids`` takes the normal
centroids from a pass without synthetic anomalies, ``centroid_method="kmeans"`` takes centroids
by spherical k-means on the embeddings instead of decoding VAE latents, ``memory_layers`` builds
the head's normal-patch memory (a PatchCore coreset of frozen domain-tower features) and fixes its
probability scale on held-out normal images.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from adcore.layers.coreset import coreset_size, greedy_coreset
from adcore.layers.vae import VAEConfig, fit_vae_centroids
from adcore.models.fusion.head import CentroidHead, CentroidHeadConfig
from adcore.training.fit import ANOMALOUS_PATCH_SHARE, FIT_EPOCH

log = logging.getLogger("adcore.train")

# Patches per class kept for the VAE: enough for 16 centroids, bounded memory and time.
MAX_PATCHES_PER_CLASS = 20000
QUICK_VAE_EPOCHS = 2  # smoke tests: the plumbing, not the centroids' quality
SYNTHETIC_FIT_IMAGES = 64  # extensions: images of the synthetic pass (anomalous centroids need few)
MEMORY_LOC_QUANTILE = 0.99  # held-out normal distance at which the memory probability is 0.5
MEMORY_SCALE_SPREAD = 4.0  # (q99 - q50) / this is the sigmoid's scale: the median normal patch gets ~0.02


def kmeans_centroids(embeddings: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means centres [k, E] (L2-normalised) of one class's embeddings [N, E]."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    if len(x) < k:  # always exactly k centroids: repeat points of a tiny class
        x = np.resize(x, (k, x.shape[1]))
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, verbose=False)
    km.train(x)
    centres = km.centroids / (np.linalg.norm(km.centroids, axis=1, keepdims=True) + 1e-12)
    return centres.astype(np.float32)


@torch.inference_mode()
def fit_pass(model, data, anomaly_share: float, max_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings [n, g*g, E] of this rank's training images and each patch's mask share [n, g*g]
    (-1 for every patch of a labelled anomaly without a mask).

    One pass of the training batches (seeded as the fit's), stopped after ``max_images`` images; at
    most the fit's patch cap is kept (whole images, a uniform sample beyond it).
    """
    device = next(model.parameters()).device
    kept = data.images_reservoir(model.grid * model.grid)
    for batch in data.batches.epoch(FIT_EPOCH, anomaly_share=anomaly_share):
        emb = model(batch.images.to(device)).patch_embeddings.float().cpu().numpy()  # [B, g*g, E]
        kept.add(emb, batch.patch_share(model.grid).numpy())  # unknown masks: -1, neither class
        if max_images is not None and kept.seen >= max_images:
            break
    return kept.arrays()


def memory_bank(features: np.ndarray, cfg, data) -> tuple[np.ndarray, float, float]:
    """Coreset bank of normal memory features [n_img, N, E_m] and its probability (loc, scale).

    The scale comes from held-out images: a bank of the even images, the odd images' distances to it.
    """

    def coreset(x: np.ndarray) -> np.ndarray:
        n, device = coreset_size(len(x), cfg.memory_coreset_ratio, cfg.memory_max_bank, cfg.memory_cpu_max_bank)
        return x[greedy_coreset(x, max(1, n // data.world_size), seed=data.seed, device=device)]

    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    if len(features) >= 2:
        half = coreset(flat(features[0::2]))
        held = torch.cdist(torch.from_numpy(flat(features[1::2])), torch.from_numpy(half)).min(1).values.numpy()
        q50, q99 = np.quantile(held, [0.5, MEMORY_LOC_QUANTILE])
    else:  # one image: nothing held out, the scale comes from the bank's own spread
        q50, q99 = 0.0, 1.0
    q50, q99 = data.gather(np.array([[q50, q99]], np.float64)).mean(0)
    bank = data.gather(coreset(flat(features)))
    scale = max(float(q99 - q50), 1e-6) / MEMORY_SCALE_SPREAD
    log.info("memory bank: %d of %d patches, loc %.4f scale %.4f", len(bank), flat(features).shape[0], q99, scale)
    return bank, float(q99), scale


def fit_centroids(model, data) -> CentroidHead:
    """Centroids of normal patches and of (synthetic or real) anomalous ones (and the memory bank)."""
    cfg = model.cfg
    cut = model.proj_dim
    clean = None
    if cfg.clean_centroids or cfg.memory_layers:
        # A clean pass of every normal image (memory, clean centroids) and a synthetic pass of a few.
        emb, share = fit_pass(model, data, 1.0, max(1, SYNTHETIC_FIT_IMAGES // data.world_size))
        normal, anomalous = emb[share == 0], emb[share >= ANOMALOUS_PATCH_SHARE]
        emb, share = fit_pass(model, data, 0.0)
        clean = emb[(share == 0).all(1)]  # real labelled anomalies are no normal reference
    else:  # paper: one pass with a synthetic anomaly in every image
        normal, anomalous = data.patches_by_class(model, anomaly_share=1.0)
    if cfg.clean_centroids:
        normal = clean[..., :cut].reshape(-1, cut)
    per_rank = MAX_PATCHES_PER_CLASS // data.world_size
    normal = data.gather(data.subsample(normal[:, :cut], per_rank))
    anomalous = data.gather(data.subsample(anomalous[:, :cut], per_rank))
    if len(anomalous) == 0:
        raise ValueError("no anomalous patches to fit centroids on (synthetic anomalies produced empty masks)")
    k = cfg.n_centroids
    if cfg.centroid_method == "kmeans":
        centroids = np.stack([kmeans_centroids(normal, k, data.seed), kmeans_centroids(anomalous, k, data.seed)])
    elif cfg.centroid_method == "vae":
        vae = VAEConfig(n_centroids=k, seed=data.seed)
        if data.quick:
            vae.epochs = QUICK_VAE_EPOCHS
        centroids = np.stack([fit_vae_centroids(normal, vae), fit_vae_centroids(anomalous, vae)])
    else:
        raise ValueError(f"unknown centroid_method {cfg.centroid_method!r}")
    log.info("centroids from %d normal and %d anomalous patches", len(normal), len(anomalous))
    head_cfg = CentroidHeadConfig(
        alpha_few=cfg.alpha_few,
        reduction=cfg.score_reduction,
        topk_fraction=cfg.topk_fraction,
        map_sigma=cfg.map_sigma_px * model.grid / model.input_size,
        smooth_distances=True,
    )
    bank = None
    if cfg.memory_layers:
        bank, head_cfg.memory_loc, head_cfg.memory_scale = memory_bank(clean[..., cut:], cfg, data)
        head_cfg.centroid_dim, head_cfg.memory_weight = cut, cfg.memory_weight
        head_cfg.memory_reduction, head_cfg.memory_reweight_k = cfg.memory_reduction, cfg.memory_reweight_k
        head_cfg.memory_weight_choices = list(cfg.memory_weight_choices)
        head_cfg.memory_scale_choices = list(cfg.memory_scale_choices)
    return CentroidHead(centroids, head_cfg, memory=bank)

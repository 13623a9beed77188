"""Tiny, fast model artifacts for plumbing tests (random-init towers, real heads and calibration)."""

from __future__ import annotations

import numpy as np
import torch

from adcore.calibration import fit_calibration
from adcore.heads import CentroidHead, MemoryBankHead
from adcore.models import create
from adcore.scorer import Scorer, prepare, upsample_map


def tiny_scorer(name: str = "fusion-small", seed: int = 0) -> Scorer:
    """A calibrated scorer around the tiny variant of a registered preset.

    Centroids / memory bank come from the model's own embeddings of seeded
    random images; calibration from a few more with half of them brightened in
    a square (their "anomaly").
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = create(name, tiny=True).eval()
    size = model.input_size
    images = [rng.random((size, size)).astype(np.float32) * 0.5 for _ in range(8)]
    masks = []
    for i, im in enumerate(images):
        m = np.zeros(im.shape, bool)
        if i % 2:
            m[size // 4 : size // 2, size // 4 : size // 2] = True
            im[m] = 1.0
        masks.append(m)
    pixels = np.stack([prepare(im, size) for im in images])
    with torch.inference_mode():
        emb = model(torch.from_numpy(pixels)).patch_embeddings.numpy()
    if model.head_kind == "centroids":
        k = model.cfg.n_centroids
        flat = emb.reshape(-1, emb.shape[-1])
        head = CentroidHead(np.stack([flat[:k], flat[k : 2 * k]]))
    else:
        head = MemoryBankHead(emb[::2].reshape(-1, emb.shape[-1]))
    scorer = Scorer(model, head)
    scores, maps = scorer.raw(pixels)
    labels = np.array([i % 2 for i in range(len(images))])
    scorer.calibration = fit_calibration(labels, scores, masks, [upsample_map(m, (size, size)) for m in maps])
    return scorer


def tiny_artifact(path: str, name: str = "fusion-small", version: int = 1) -> str:
    return tiny_scorer(name).save(str(path), model_name=f"{name}-tiny", version=version)

"""DRA's head and reference normals (no gradients)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from adcore.models.dra.head import DRAHead

log = logging.getLogger("adcore.train")


def choose_references(model, pixels, labels, seed: int) -> np.ndarray:
    """Fix ``n_ref`` normal training images, drawn with ``seed``, as the model's references; returns their indices."""
    normal = np.flatnonzero(np.asarray(labels) == 0)
    n = model.cfg.n_ref
    if len(normal) < n:
        raise ValueError(f"DRA needs at least {n} normal training images for its references, got {len(normal)}")
    chosen = np.sort(np.random.default_rng(seed).choice(normal, n, replace=False))
    model.set_references(torch.from_numpy(np.stack([np.asarray(pixels[i], np.float32) for i in chosen])))
    log.info("DRA reference normals: training images %s", chosen.tolist())
    return chosen


def fit_dra(model, data) -> DRAHead:
    """DRA scores in the network; the head passes through. References are fixed here only when
    no training ran (test-size builders): training fixes them before its first step."""
    if not model.has_references():
        choose_references(model, data.batches.pixels, data.batches.labels, data.seed)
    return DRAHead()

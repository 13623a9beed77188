"""Test-size builders: calibrated scorers around a preset's tiny, random-init variant.

For plumbing tests, smoke runs and overhead benchmarks: the architecture, head and
calibration are the real ones (built by the family's own ``fit``), only the towers
are tiny and untrained. Nothing here touches global random state.
"""

from __future__ import annotations

import numpy as np
import torch

from adcore.calibration import fit_calibration
from adcore.models import create, family_for
from adcore.scorer import Scorer
from adcore.training.data import SyntheticAnomalyBatches
from adcore.training.fit import FitData

TINY_IMAGES = 8  # per split; every other one gets a bright square (its "anomaly")


def _images(rng: np.random.Generator, size: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    images, masks = [], []
    for i in range(TINY_IMAGES):
        image = rng.random((size, size)).astype(np.float32) * 0.5
        mask = np.zeros((size, size), bool)
        if i % 2:
            mask[size // 4 : size // 2, size // 4 : size // 2] = True
            image[mask] = 1.0
        images.append(image)
        masks.append(mask)
    return images, masks, np.arange(TINY_IMAGES) % 2


def tiny_scorer(preset: str = "fusion-small", seed: int = 0) -> Scorer:
    """A calibrated scorer: head fit on seeded random images, calibration on others."""
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create(preset, tiny=True).eval()
    size = model.input_size
    train_images, train_masks, train_labels = _images(rng, size)
    batches = SyntheticAnomalyBatches(train_images, train_masks, train_labels, size, batch_size=4, seed=seed)
    scorer = Scorer(model, family_for(model).fit(model, FitData(batches, seed=seed, quick=True)))
    images, masks, labels = _images(rng, size)
    results = scorer.score_images(images)
    scorer.calibration = fit_calibration(
        labels, np.array([r.raw_score for r in results]), masks, [r.raw_map for r in results]
    )
    return scorer


def tiny_artifact(path: str, preset: str = "fusion-small", version: int = 1) -> str:
    """Save :func:`tiny_scorer` as an artifact named ``<preset>-tiny``; returns its path."""
    return tiny_scorer(preset).save(str(path), model_name=f"{preset}-tiny", version=version)

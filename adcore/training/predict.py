"""Run a scorer's network and head over decoded images (validation, evaluation)."""

from __future__ import annotations

import numpy as np

from adcore.scorer import Scorer, prepare, upsample_map


def predict(scorer: Scorer, images: list[np.ndarray], batch_size: int = 8) -> dict:
    """Raw scores [N] and raw maps (each at its image's own size)."""
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = np.stack([prepare(im, scorer.input_size) for im in chunk])
        s, m = scorer.raw(pixels)
        scores.append(np.asarray(s, np.float32))
        maps += [upsample_map(mi, im.shape[:2]) for mi, im in zip(m, chunk)]
    return {"scores": np.concatenate(scores) if scores else np.zeros(0, np.float32), "maps": maps}

"""What a family's ``fit`` gets to build its head from training data (no gradients).

``FitData`` wraps the training batches (normal images, a share given a synthetic
anomaly) and how ranks combine their parts, so a family's fit works the same in
one process, under Ray Train, and for the tiny test-size builders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from adcore.training import dist

# A patch is anomalous when at least this share of its pixels is in the mask, normal when none is.
ANOMALOUS_PATCH_SHARE = 0.5
FIT_EPOCH = 10_000  # synthesis seed of the fit's pass, distinct from training epochs


def _identity(array: np.ndarray) -> np.ndarray:
    return array


@dataclass
class FitData:
    """Training data for a head, as one rank sees it.

    Attributes:
        batches: ``SyntheticAnomalyBatches`` of this rank's shard.
        seed: Seed of any sampling the fit does.
        quick: Smoke test: fewer optimisation steps wherever the fit has some.
        world_size: Ranks that each hold a shard; ``gather`` concatenates their arrays.
    """

    batches: object
    seed: int = 0
    quick: bool = False
    world_size: int = 1
    gather: Callable[[np.ndarray], np.ndarray] = field(default=_identity)

    @torch.inference_mode()
    def patches_by_class(self, model, anomaly_share: float) -> tuple[np.ndarray, np.ndarray]:
        """Patch embeddings [n, E] of this rank's normal and anomalous patches.

        Every normal image gets a synthetic anomaly with probability ``anomaly_share``. A labelled
        anomaly without a mask gives no patch to either class.
        """
        normal, anomalous = [], []
        device = next(model.parameters()).device
        for batch in self.batches.epoch(FIT_EPOCH, anomaly_share=anomaly_share):
            out = model(batch.images.to(device))
            emb = out.patch_embeddings.float().cpu().numpy()  # [B, g*g, E]
            share = batch.patch_share(model.grid).numpy()  # [B, g*g]; unknown masks: neither class
            normal.append(emb[share == 0])
            anomalous.append(emb[share >= ANOMALOUS_PATCH_SHARE])
        return np.concatenate(normal), np.concatenate(anomalous)

    def subsample(self, x: np.ndarray, n: int) -> np.ndarray:
        """At most ``n`` rows of ``x``, drawn with this fit's seed."""
        if len(x) <= n:
            return x
        return x[np.random.default_rng(self.seed).choice(len(x), n, replace=False)]


def gather_across_ranks(world_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Concatenate an array over the ranks of an initialised process group (identity alone).

    Tensor collectives on the process group's device (NCCL: the rank's GPU), not pickles.
    """
    if not dist.active(world_size):
        return _identity

    def gather(array: np.ndarray) -> np.ndarray:
        return dist.gather_arrays(array, world_size)

    return gather

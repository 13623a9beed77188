"""What a family's ``fit`` gets to build its head from training data (no gradients).

``FitData`` wraps the training batches (normal images, a share given a synthetic
anomaly) and how ranks combine their parts, so a family's fit works the same in
one process, under Ray Train, and for the tiny test-size builders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from adcore.training import dist
from adcore.training.reservoir import Reservoir

log = logging.getLogger("adcore.train")

# A patch is anomalous when at least this share of its pixels is in the mask, normal when none is.
ANOMALOUS_PATCH_SHARE = 0.5
FIT_EPOCH = 10_000  # synthesis seed of the fit's pass, distinct from training epochs
# Patch embeddings a rank keeps per class for a fit (--fit-max-patches): about 1.2 GB of 768-wide
# float32 rows; a PatchCore bank (at most 8192 rows) is drawn from far fewer.
FIT_MAX_PATCHES = 400_000


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
        max_patches: Patch embeddings (rows) a rank keeps per class; beyond it, a uniform sample
            (:class:`~adcore.training.reservoir.Reservoir`).
    """

    batches: object
    seed: int = 0
    quick: bool = False
    world_size: int = 1
    gather: Callable[[np.ndarray], np.ndarray] = field(default=_identity)
    max_patches: int = FIT_MAX_PATCHES

    def patches_by_class(self, model, anomaly_share: float) -> tuple[np.ndarray, np.ndarray]:
        """Patch embeddings [n, E] of this rank's normal and anomalous patches (each at most
        ``max_patches``; all of them, in order, when they fit).

        Every normal image gets a synthetic anomaly with probability ``anomaly_share``. A labelled
        anomaly without a mask gives no patch to either class.
        """
        normal, anomalous = self.patch_reservoirs(model, anomaly_share)
        return normal.rows(), anomalous.rows()

    @torch.inference_mode()
    def patch_reservoirs(self, model, anomaly_share: float) -> tuple[Reservoir, Reservoir]:
        """:meth:`patches_by_class` as reservoirs, which also count the patches seen (``seen``)."""
        normal = Reservoir(self.max_patches, seed=[self.seed, 0])
        anomalous = Reservoir(self.max_patches, seed=[self.seed, 1])
        device = next(model.parameters()).device
        for batch in self.batches.epoch(FIT_EPOCH, anomaly_share=anomaly_share):
            out = model(batch.images.to(device))
            emb = out.patch_embeddings.float().cpu().numpy()  # [B, g*g, E]
            share = batch.patch_share(model.grid).numpy()  # [B, g*g]; unknown masks: neither class
            normal.add(emb[share == 0])
            anomalous.add(emb[share >= ANOMALOUS_PATCH_SHARE])
        for name, kept in (("normal", normal), ("anomalous", anomalous)):
            if kept.seen > kept.cap:
                log.info("fit: %d of the rank's %d %s patches (--fit-max-patches)", kept.cap, kept.seen, name)
        return normal, anomalous

    def images_reservoir(self, grid_cells: int) -> Reservoir:
        """A reservoir for whole images of ``grid_cells`` patches each, within ``max_patches``."""
        return Reservoir(max(1, self.max_patches // grid_cells), seed=[self.seed, 2])

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

"""DRA's training batches: normal, labelled (seen) and pseudo anomalies in the official code's proportions.

Each step draws ``normal_share`` of the batch from normal images and the rest from the labelled
anomalies, each group walking through its own shuffled order (official ``BalancedBatchSampler``);
a drawn normal becomes a pseudo anomaly with probability ``pseudo_p``, made from a random normal
image (official ``MVTecAD.__getitem__``) by CutMix or by adcore's synthesis. Every image is then
randomly rotated (official ``RandomRotation(180)``). Labels: 0 normal, 1 seen, 2 pseudo.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from adcore.data.synth import RandCutMix, RandCutPaste, RandPerlinAnomaly
from adcore.models.dra.loss import NORMAL, PSEUDO, SEEN
from adcore.training.data import foreground_mask


@dataclass
class DRABatch:
    images: torch.Tensor  # [B, 3, S, S] in [0, 1]
    labels: torch.Tensor  # [B] int64: 0 normal, 1 seen anomaly, 2 pseudo anomaly


def _cycle(rng: np.random.Generator, indices: np.ndarray) -> Iterator[int]:
    while True:
        yield from rng.permutation(indices).tolist()


class BalancedBatches:
    """Seeded DRA batches from prepared training pixels ([3, S, S] each) and their labels (0/1).

    Args:
        pixels: Training images at the network's input size.
        labels: 0 normal, 1 labelled anomaly.
        cfg: The model's ``DRAConfig`` (batch size, shares, pseudo kinds, rotation).
        seed: Every random choice comes from this seed and the epoch number.
    """

    def __init__(self, pixels, labels, cfg, seed):
        self.pixels = list(pixels)
        labels = np.asarray(labels)
        self.normal = np.flatnonzero(labels == 0)
        self.anomalous = np.flatnonzero(labels == 1)
        if not len(self.normal):
            raise ValueError("DRA needs normal training images; the training split has none")
        if not len(self.anomalous):
            raise ValueError(
                "DRA trains on labelled anomalies and this training set has none: put a few under "
                "train/Ungood/img and pass --labelled N"
            )
        self.cfg, self.seed = cfg, seed
        self.n_normal = max(1, int(round(cfg.batch_size * cfg.normal_share)))
        self.n_seen = max(1, cfg.batch_size - self.n_normal)

    def _pseudo(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray | None:
        """A pseudo anomaly made from ``image`` [S, S, 3], or None when synthesis changed nothing."""
        kind = self.cfg.pseudo_kinds[int(rng.integers(len(self.cfg.pseudo_kinds)))]
        if kind == "cutmix":
            maker = RandCutMix(rng)
        else:  # adcore's synthesis: Perlin texture, another normal image as texture, CutPaste
            others = [self.pixels[i].transpose(1, 2, 0) for i in rng.choice(self.normal, min(4, len(self.normal)))]
            makers = [RandPerlinAnomaly(rng), RandPerlinAnomaly(rng, texture_source=others), RandCutPaste(rng)]
            maker = makers[int(rng.integers(len(makers)))]
        out, mask = maker(image, foreground=foreground_mask(image))
        return out if mask.any() else None

    def _rotate(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        if not self.cfg.rotation_deg:
            return image
        angle = rng.uniform(-self.cfg.rotation_deg, self.cfg.rotation_deg)
        return ndimage.rotate(image, angle, axes=(1, 0), reshape=False, order=1, mode="constant", cval=0.0)

    def epoch(self, epoch: int, steps: int) -> Iterator[DRABatch]:
        rng = np.random.default_rng([*np.atleast_1d(self.seed).tolist(), epoch])
        normal, seen = _cycle(rng, self.normal), _cycle(rng, self.anomalous)
        for _ in range(steps):
            images, labels = [], []
            for _ in range(self.n_normal):
                i, label = next(normal), NORMAL
                img = self.pixels[i].transpose(1, 2, 0)  # [S, S, 3]
                if rng.random() < self.cfg.pseudo_p:
                    made = self._pseudo(rng, self.pixels[int(rng.choice(self.normal))].transpose(1, 2, 0))
                    if made is not None:
                        img, label = made, PSEUDO
                images.append(img)
                labels.append(label)
            for _ in range(self.n_seen):
                images.append(self.pixels[next(seen)].transpose(1, 2, 0))
                labels.append(SEEN)
            batch = [np.ascontiguousarray(self._rotate(rng, im).transpose(2, 0, 1), dtype=np.float32) for im in images]
            yield DRABatch(torch.from_numpy(np.clip(np.stack(batch), 0, 1)), torch.tensor(labels, dtype=torch.int64))

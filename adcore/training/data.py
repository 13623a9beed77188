"""Training and validation data: BMAD splits, synthetic anomalies, batching.

Training sets are mostly (often only) normal images; the fusion model's
segmentation loss needs masks, so a share of training images gets a
synthesised anomaly (Perlin-noise texture, CutPaste, or a lesion) with its
mask. Real labelled anomalies in the training split are used as they are; one without a mask
is image-level supervision only (its mask is unknown, so none of its patches counts as normal or as
anomalous, and it adds nothing to a segmentation loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from adcore.data import bmad
from adcore.data.synth import RandCutPaste, RandPerlinAnomaly
from adcore.scorer import prepare

# Pixels above this intensity count as foreground (anatomy) when placing synthetic anomalies.
FOREGROUND_LEVEL = 0.05
# Below this foreground share the image is treated as all-foreground (e.g. chest X-ray, pathology).
MIN_FOREGROUND_SHARE = 0.1
UNKNOWN_SHARE = -1.0  # patch mask share of an image whose mask is unknown (never 0, never >= 0.5)


def foreground_mask(image: np.ndarray) -> np.ndarray | None:
    gray = image if image.ndim == 2 else image.mean(-1)
    fg = gray > FOREGROUND_LEVEL
    return fg if fg.mean() >= MIN_FOREGROUND_SHARE else None


def load_images(samples: list[bmad.Sample]) -> tuple[list[np.ndarray], list[np.ndarray | None], np.ndarray]:
    images, masks = [], []
    for s in samples:
        image, mask = bmad.load_sample(s)
        images.append(image)
        masks.append(mask)
    return images, masks, np.array([s.label for s in samples], dtype=np.int64)


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, S, S] in [0, 1]
    masks: torch.Tensor  # [B, S, S] float {0, 1}
    labels: torch.Tensor  # [B] float {0, 1}
    known: torch.Tensor  # [B] bool: the mask is pixel ground truth (False: a labelled anomaly without one)

    def to(self, device: torch.device) -> Batch:
        """This batch on ``device`` (pinned and copied asynchronously to a GPU)."""
        if device.type == "cpu":
            return self
        move = lambda t: t.pin_memory().to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.images), move(self.masks), move(self.labels), move(self.known))

    def patch_share(self, grid: int) -> torch.Tensor:
        """[B, g*g] share of each patch's pixels in the mask; -1 where the mask is unknown, so such a
        patch is neither normal (share 0) nor anomalous (share >= ``ANOMALOUS_PATCH_SHARE``)."""
        share = F.adaptive_avg_pool2d(self.masks[:, None].float(), grid).flatten(1)
        return torch.where(self.known[:, None].to(share.device), share, torch.full_like(share, UNKNOWN_SHARE))


# (rng, other normal images [S, S, 3]) -> anomaly makers: maker(image, foreground=...) -> (image, mask).
MakerFactory = Callable[[np.random.Generator, list[np.ndarray]], list]


def default_makers(rng: np.random.Generator, others: list[np.ndarray]) -> list:
    """Procedural textures, other normal images as foreign texture (foreign patch interpolation in
    spirit: anatomy at the wrong place), and CutPaste."""
    return [RandPerlinAnomaly(rng), RandPerlinAnomaly(rng, texture_source=others), RandCutPaste(rng)]


class SyntheticAnomalyBatches:
    """Iterates shuffled batches of normal images, a share made anomalous by synthesis.

    Args:
        images: decoded training images (HxW or HxWxC in [0, 1]).
        masks: their masks (None for normal images; None for a labelled anomaly: its mask is unknown).
        labels: 0 normal, 1 real anomaly.
        size: network input size.
        anomaly_share: probability that a normal image gets a synthetic anomaly.
        seed: all randomness comes from this seed and the epoch number.
    """

    def __init__(self, images, masks, labels, size: int, batch_size: int, anomaly_share: float = 0.5, seed: int = 0):
        self.pixels = [prepare(im, size) for im in images]  # [3, S, S] each, resized once
        self.labels = np.asarray(labels)
        # A labelled anomaly without a mask keeps None (unknown): image-level supervision only.
        self.masks = [
            resize_mask(m, size) if m is not None else None if lab else np.zeros((size, size), bool)
            for m, lab in zip(masks, self.labels)
        ]
        self.size, self.batch_size = size, batch_size
        self.anomaly_share, self.seed = anomaly_share, seed

    def __len__(self) -> int:
        return (len(self.pixels) + self.batch_size - 1) // self.batch_size

    @property
    def image_level_only(self) -> int:
        """Labelled anomalies without a mask (image-level supervision only)."""
        return sum(m is None for m in self.masks)

    def epoch(self, epoch: int, anomaly_share: float | None = None, makers: MakerFactory | None = None):
        """One shuffled pass.

        Args:
            epoch: seeds the pass (with the batches' seed).
            anomaly_share: overrides the share of synthetic anomalies for this pass.
            makers: ``(rng, others) -> [maker, ...]``, the synthesis of this pass (one maker drawn per
                image); default :func:`default_makers`.
        """
        share = self.anomaly_share if anomaly_share is None else anomaly_share
        rng = np.random.default_rng([self.seed, epoch])
        others = [p.transpose(1, 2, 0) for p in self.pixels]
        makers = (makers or default_makers)(rng, others)
        order = rng.permutation(len(self.pixels))
        for start in range(0, len(order), self.batch_size):
            yield stack_batch(
                synthesize(self.pixels[i].transpose(1, 2, 0), self.masks[i], int(self.labels[i]), rng, share, makers)
                for i in order[start : start + self.batch_size]
            )


def synthesize(img: np.ndarray, mask, label: int, rng: np.random.Generator, share: float, makers) -> tuple:
    """One training image ``[S, S, 3]``: a normal one gets a synthetic anomaly with probability ``share``
    from one of ``makers`` (a list, or a callable returning it, built only when needed).

    Returns ``(image, mask, label)``; the label says whether the synthetic mask is non-empty. ``mask``
    None (a labelled anomaly without a mask) stays None: unknown.
    """
    if label == 0 and rng.random() < share:
        options = makers() if callable(makers) else makers
        img, mask = options[int(rng.integers(len(options)))](img, foreground=foreground_mask(img))
        label = int(np.asarray(mask).any())
    return img, mask, label


def stack_batch(items) -> Batch:
    """``(image [S, S, 3], mask [S, S] or None (unknown), label)`` items -> a :class:`Batch`."""
    imgs, msks, lbls, known = [], [], [], []
    for img, mask, label in items:
        img = np.ascontiguousarray(np.asarray(img, np.float32).transpose(2, 0, 1))
        imgs.append(img)
        msks.append(np.zeros(img.shape[1:], np.float32) if mask is None else np.asarray(mask, np.float32))
        lbls.append(label)
        known.append(mask is not None)
    return Batch(
        torch.from_numpy(np.stack(imgs)),
        torch.from_numpy(np.stack(msks)),
        torch.tensor(lbls, dtype=torch.float32),
        torch.tensor(known, dtype=torch.bool),
    )


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(t, size=(size, size), mode="area")[0, 0] >= 0.5).numpy()

"""DRA's deviation loss and head routing (papers.md section 4; official DeviationLoss, generate_target)."""

from __future__ import annotations

import torch

from adcore.models.dra.config import HEADS

NORMAL, SEEN, PSEUDO = 0, 1, 2  # training labels: normal, labelled (seen) anomaly, pseudo anomaly


def deviation_loss(scores: torch.Tensor, targets: torch.Tensor, ref: torch.Tensor, margin: float = 5.0) -> torch.Tensor:
    """Mean over the batch of |dev| (inliers) and max(0, margin - dev) (outliers).

    ``dev = (score - mean(ref)) / std(ref)`` with ``ref`` draws of N(0, 1) (the paper: 5000, drawn
    afresh each step; std unbiased, as ``torch.std``). ``targets`` is 1 for outliers, 0 for inliers.
    """
    dev = (scores - ref.mean()) / ref.std()
    inlier = dev.abs()
    outlier = (margin - dev).clamp(min=0)
    t = targets.to(scores.dtype)
    return ((1 - t) * inlier + t * outlier).mean()


def routed_targets(labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per head (``HEADS`` order): which samples it is trained on, and their outlier targets.

    As the official code routes them: the normal head sees every sample and its outliers are the
    *normal* images; the seen head sees normal + seen; the pseudo head normal + pseudo; the
    residual head every sample, outliers being any anomaly.
    """
    every = torch.ones_like(labels, dtype=torch.bool)
    return [
        (every, labels == NORMAL),
        (labels != PSEUDO, labels == SEEN),
        (labels != SEEN, labels == PSEUDO),
        (every, labels != NORMAL),
    ]


def dra_loss(
    head_scores: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, margin: float = 5.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over the four heads of their deviation losses; also each head's value (for logs)."""
    total, parts = head_scores.new_zeros(()), {}
    for i, (rows, target) in enumerate(routed_targets(labels)):
        if not rows.any():  # e.g. a batch without normal images: nothing routes to this head
            continue
        loss = deviation_loss(head_scores[rows, i], target[rows], ref, margin)
        total = total + loss
        parts[HEADS[i]] = float(loss.detach())
    return total, parts

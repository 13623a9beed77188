"""Segmentation and classification losses: focal, Dice, and their sum with BCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = None
) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017) on logits; ``alpha`` (optional) weighs the positive class."""
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    loss = (1 - p_t) ** gamma * bce
    if alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.mean()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per image, averaged; ``eps`` smooths images without anomaly."""
    target = target.to(probs.dtype).flatten(1)
    probs = probs.flatten(1)
    inter = (probs * target).sum(1)
    union = probs.sum(1) + target.sum(1)
    return (1 - (2 * inter + eps) / (union + eps)).mean()


def fusion_loss(
    image_logit: torch.Tensor, map_logit: torch.Tensor, label: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Paper loss: BCEWithLogits (image) + Dice + Focal (pixels). Maps and masks share a size.

    Dice is taken on both columns of the two-way softmax (anomalous vs the mask,
    normal vs its complement), as AnomalyCLIP and MVFA-AD do: on a normal image the
    anomalous-column Dice alone has a vanishing gradient, the normal column does not.
    """
    bce = F.binary_cross_entropy_with_logits(image_logit, label.to(image_logit.dtype))
    probs = torch.sigmoid(map_logit)
    dice = dice_loss(probs, mask) + dice_loss(1 - probs, 1 - mask)
    focal = focal_loss(map_logit, mask)
    return {"loss": bce + dice + focal, "bce": bce.detach(), "dice": dice.detach(), "focal": focal.detach()}

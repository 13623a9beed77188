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


def pixel_losses(map_logit: torch.Tensor, mask: torch.Tensor, known: torch.Tensor | None = None) -> tuple:
    """(two-column Dice, Focal) of maps against masks, on the images whose mask is ``known`` ([B] bool;
    None: all). Without such an image both are a zero that keeps every logit in the graph (DDP)."""
    if known is not None and not bool(known.all()):
        if not bool(known.any()):
            zero = map_logit.sum() * 0.0
            return zero, zero
        map_logit, mask = map_logit[known], mask[known]
    probs = torch.sigmoid(map_logit)
    return dice_loss(probs, mask) + dice_loss(1 - probs, 1 - mask), focal_loss(map_logit, mask)


def fusion_loss(
    image_logit: torch.Tensor,
    map_logit: torch.Tensor,
    label: torch.Tensor,
    mask: torch.Tensor,
    known: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Paper loss: BCEWithLogits (image) + Dice + Focal (pixels). Maps and masks share a size.

    Dice is taken on both columns of the two-way softmax (anomalous vs the mask,
    normal vs its complement), as AnomalyCLIP and MVFA-AD do: on a normal image the
    anomalous-column Dice alone has a vanishing gradient, the normal column does not.
    ``known`` ([B] bool) marks images whose mask is ground truth; the others (labelled
    anomalies without a mask) count for the image term only.
    """
    bce = F.binary_cross_entropy_with_logits(image_logit, label.to(image_logit.dtype))
    dice, focal = pixel_losses(map_logit, mask, known)
    return {"loss": bce + dice + focal, "bce": bce.detach(), "dice": dice.detach(), "focal": focal.detach()}

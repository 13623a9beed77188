"""EntroAD's gradient stage: the routing paths and prompts trained on one (auxiliary) domain.

One stage on normal images of the training domain and their synthetic anomalies (the zero-shot
protocol: no target-domain image is ever seen). Loss (adcore; the abstract gives none): the fusion
model's BCE (exported score) + Dice + Focal (patch map) on the blended logits, plus
``prior_loss_weight`` times the same segmentation loss on the frozen-prompt branch alone, so the
joint space stays aligned with the frozen prompts the prior branch falls back to. Every epoch ends
with validation AUROC on the training domain's validation split; the best epoch's weights are kept.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adcore.layers.losses import fusion_loss, pixel_losses
from adcore.training.stages import TrainContext, format_row, run_stage, validate

log = logging.getLogger("adcore.train")
STAGE = "entroad"


class _Branches(nn.Module):
    """The forward DDP must see: every branch the loss uses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model.branches(images)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def _upsample(logits: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    maps = logits.reshape(-1, 1, grid, grid)
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def entroad_loss(branches, masks: torch.Tensor, labels: torch.Tensor, mask_size: int, prior_weight: float, known=None):
    """Loss on the blended output plus ``prior_weight`` x Dice + Focal of the prior branch alone; images
    whose mask is not ``known`` ([B] bool) count for the image term only."""
    out = branches.output
    grid = out.map_logit.shape[-1]
    target = (F.interpolate(masks[:, None], size=(mask_size, mask_size), mode="area")[:, 0] >= 0.5).float()
    loss = fusion_loss(out.image_logit, _upsample(out.map_logit, grid, mask_size), labels, target, known)["loss"]
    if prior_weight:
        dice, focal = pixel_losses(_upsample(branches.prior_logit, grid, mask_size), target, known)
        loss = loss + prior_weight * (dice + focal)
    return loss


def train_entroad(model, ctx: TrainContext) -> dict:
    """The one stage; returns the selected epoch for the artifact's training summary."""
    cfg, hooks, world = ctx.cfg, ctx.hooks, ctx.hooks.world_size
    best = ctx.resume.get("best") or {"score": -math.inf, "epoch": None, "model": None}
    prior_weight = model.cfg.prior_loss_weight

    def step(module: nn.Module, batch) -> torch.Tensor:
        return entroad_loss(module(batch.images), batch.masks, batch.labels, cfg.mask_size, prior_weight, batch.known)

    def keep_if_best(row: dict) -> None:
        aurocs = [row[k] for k in ("val_image_auroc", "val_pixel_auroc") if row.get(k) is not None]
        if aurocs and float(np.mean(aurocs)) > best["score"]:
            best.update(score=float(np.mean(aurocs)), epoch=row["epoch"], model=_trainable_state(model))

    def on_epoch(epoch: int, loss: float) -> dict:
        model.eval()
        row = {"stage": STAGE, "epoch": epoch + 1, "loss": loss, **validate(model, ctx.valid, cfg.batch_size, world)}
        row["elapsed_s"] = round(ctx.elapsed(), 1)
        ctx.history.append(row)
        keep_if_best(row)
        if hooks.is_main:
            log.info("validation after epoch %d: %s", epoch + 1, format_row(row))
        return row

    run_stage(
        STAGE,
        _Branches(model),
        model.trainable_parameters(),
        ctx,
        cfg.stage_epochs(),
        cfg.lr,
        step,
        cfg.budget_s(2, ctx.elapsed()),
        cfg.warmup_share,
        on_epoch=on_epoch,
        state_fn=lambda: {"model": _trainable_state(model), "best": best},
    )
    if best["model"] is not None:
        model.load_state_dict(best["model"], strict=False)
        if hooks.is_main:
            log.info("keeping the weights of epoch %s (validation AUROC %.4f)", best["epoch"], best["score"])
    return {"selected_epoch": best["epoch"]}

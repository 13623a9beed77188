"""The fusion model's gradient stages (papers.md section 1).

1. The domain tower fine-tuned as a binary normal/anomalous classifier
   (AdamW lr 5e-5, focal loss, 5% warm-up) on normal + synthesised anomalies.
2. Adapters, projection and the vision tower's last layer trained with
   BCE + Dice + Focal; every epoch ends with validation image/pixel AUROC, and the
   weights of the best validation epoch are kept (never the test split).

Extensions (docs/models/fusion.md): ``synthesis="smooth"`` draws half the training anomalies
of both stages from :mod:`adcore.data.synth_smooth`; ``epoch_average`` validates, selects and keeps
an exponential average of the stage-2 weights over epochs instead of one epoch's weights;
``domain_train_layers`` 0 skips stage 1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adcore.data.synth_smooth import smooth_makers
from adcore.layers.losses import focal_loss, fusion_loss
from adcore.training.stages import TrainContext, format_row, run_stage, validate

log = logging.getLogger("adcore.train")


class _DomainClassifier(nn.Module):
    """Stage 1 as a module of its own, so DDP sees the forward it must sync."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.domain_logit(images)


def _trained_names(model: nn.Module) -> set[str]:
    """Parameters any stage trains (stage 1's domain layers too), for checkpoints; leaves stage 2 trainable."""
    names = set()
    for stage in (1, 2):
        model.freeze_for_stage(stage)
        names |= {n for n, p in model.named_parameters() if p.requires_grad}
    return names


def _trainable_state(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names or k == "anchors"}


def _averaged(average: dict | None, current: dict[str, torch.Tensor], decay: float) -> dict[str, torch.Tensor]:
    """One epoch's update of the exponential weight average (the first epoch starts it)."""
    if average is None:
        return current
    return {k: decay * average[k] + (1 - decay) * v if v.is_floating_point() else v for k, v in current.items()}


def _fusion_step(mask_size: int):
    def step(model: nn.Module, batch) -> torch.Tensor:
        out = model(batch.images)
        size = (mask_size, mask_size)
        logits = F.interpolate(out.map_logit[:, None], size=size, mode="bilinear", align_corners=False)
        target = F.interpolate(batch.masks[:, None], size=size, mode="area")
        mask = (target[:, 0] >= 0.5).float()
        return fusion_loss(out.image_logit, logits[:, 0], batch.labels, mask, batch.known)["loss"]

    return step


def _domain_step(model: nn.Module, batch) -> torch.Tensor:
    return focal_loss(model(batch.images), batch.labels)


class _WithMakers:
    """Training batches whose passes draw their synthetic anomalies from ``makers``."""

    def __init__(self, batches, makers):
        self.batches, self.makers = batches, makers

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, anomaly_share: float | None = None):
        return self.batches.epoch(epoch, anomaly_share=anomaly_share, makers=self.makers)


SYNTHESIS = {"default": None, "smooth": smooth_makers}


def train_fusion(model, ctx: TrainContext) -> dict:
    """Stages 1 and 2; returns what the artifact's training summary adds (the selected epoch).

    Both stages checkpoint after every epoch (``run_stage``); a resumed run skips what the
    checkpoint says is done and continues the stage it was in.
    """
    if model.cfg.synthesis not in SYNTHESIS:
        raise ValueError(f"unknown synthesis {model.cfg.synthesis!r}; choose one of {sorted(SYNTHESIS)}")
    if SYNTHESIS[model.cfg.synthesis] is not None:
        ctx = replace(ctx, batches=_WithMakers(ctx.batches, SYNTHESIS[model.cfg.synthesis]))
    cfg, hooks, resume = ctx.cfg, ctx.hooks, ctx.resume
    world = hooks.world_size
    trained = _trained_names(model)  # leaves stage 2's parameters trainable
    if model.cfg.domain_train_layers > 0 and not ctx.finished("domain"):  # 0: the domain tower stays as loaded
        model.freeze_for_stage(1)
        run_stage(
            "domain",
            _DomainClassifier(model),
            model.trainable_parameters(),
            ctx,
            cfg.domain_epochs,
            cfg.domain_lr,
            _domain_step,
            cfg.budget_s(1),
            cfg.warmup_share,
            state_fn=lambda: {"model": _trainable_state(model, trained)},
        )
    model.freeze_for_stage(2)
    best = resume.get("best") or {"score": -math.inf, "epoch": None, "model": None}
    average = {"model": resume.get("average")}  # extension epoch_average: the averaged weights so far

    def keep_if_best(row: dict) -> None:
        """Model selection on the validation split: mean of its AUROCs (averaged over ranks: one decision)."""
        aurocs = [row[k] for k in ("val_image_auroc", "val_pixel_auroc") if row.get(k) is not None]
        if aurocs and float(np.mean(aurocs)) > best["score"]:
            best.update(score=float(np.mean(aurocs)), epoch=row["epoch"], model=_trainable_state(model, trained))

    def on_epoch(epoch: int, loss: float) -> dict:
        model.eval()
        decay, current = model.cfg.epoch_average, None
        if decay > 0:  # validate (and keep) the average; training goes on from the raw weights
            current = _trainable_state(model, trained)
            average["model"] = _averaged(average["model"], current, decay)
            model.load_state_dict(average["model"], strict=False)
        row = {"stage": "fusion", "epoch": epoch + 1, "loss": loss, **validate(model, ctx.valid, cfg.batch_size, world)}
        row["elapsed_s"] = round(ctx.elapsed(), 1)
        ctx.history.append(row)
        keep_if_best(row)
        if current is not None:
            model.load_state_dict(current, strict=False)
        if hooks.is_main:
            log.info("validation after epoch %d: %s", epoch + 1, format_row(row))
        return row

    saved = ctx.resume_for("fusion")
    if saved is None:  # the adapters as initialised are a candidate too
        row = {"stage": "fusion", "epoch": 0, "loss": None}
        row |= validate(model.eval(), ctx.valid, cfg.batch_size, world)
        ctx.history.append(row)
        keep_if_best(row)
        if hooks.is_main:
            log.info("validation before stage 2: %s", format_row(row))
    run_stage(
        "fusion",
        model,
        model.trainable_parameters(),
        ctx,
        cfg.stage_epochs(),
        cfg.lr,
        _fusion_step(cfg.mask_size),
        cfg.budget_s(2, ctx.elapsed()),
        cfg.warmup_share,
        on_epoch=on_epoch,
        state_fn=lambda: {"model": _trainable_state(model, trained), "best": best, "average": average["model"]},
    )
    if best["model"] is not None:
        model.load_state_dict(best["model"], strict=False)
        if hooks.is_main:
            log.info("keeping the weights of epoch %s (validation AUROC %.4f)", best["epoch"], best["score"])
    return {"selected_epoch": best["epoch"]}

"""Building blocks of a family's gradient stages: the epoch loop, validation, model selection.

A family's ``train(model, ctx)`` (e.g. :mod:`adcore.models.fusion.train`) composes these;
:class:`TrainContext` is everything the generic loop hands it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from adcore import metrics
from adcore.scorer import NetworkOnlyHead, Scorer

log = logging.getLogger("adcore.train")


@dataclass
class TrainContext:
    """What the generic loop hands a family's gradient stages.

    Attributes:
        cfg: The run's ``TrainConfig``.
        hooks: ``TrainHooks`` (rank, DDP wrapping, reporting, resume state).
        batches: This rank's ``SyntheticAnomalyBatches``.
        valid: The validation split (``load_split``): images, labels, masks.
        started: ``time.monotonic()`` at the start of the run (time budgets).
        history: Per-epoch rows; the family appends, the artifact keeps them.
    """

    cfg: Any
    hooks: Any
    batches: Any
    valid: dict
    started: float
    history: list[dict] = field(default_factory=list)

    @property
    def resume(self) -> dict:
        return self.hooks.resume or {}

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def reduce_mean(value: float, hooks) -> float:
    if hooks.world_size > 1 and torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / hooks.world_size
    return value


def run_stage(
    name: str,
    module: nn.Module,
    params: list[nn.Parameter],
    ctx: TrainContext,
    epochs: int,
    lr: float,
    step_fn: Callable[[nn.Module, Any], torch.Tensor],
    budget_s: float | None,
    warmup_share: float = 0.0,
    start_epoch: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> None:
    """AdamW with linear warm-up over ``epochs`` passes of ``ctx.batches``, within ``budget_s``."""
    cfg, hooks, batches = ctx.cfg, ctx.hooks, ctx.batches
    wrapped = hooks.wrap(module)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = max(1, epochs * len(batches))
    warm = max(1, int(total * warmup_share)) if warmup_share else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    started = time.monotonic()
    max_steps = 2 if cfg.smoke_test else None
    for epoch in range(start_epoch, epochs):
        losses = []
        wrapped.train()
        for step, batch in enumerate(batches.epoch(epoch)):
            loss = step_fn(wrapped, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if max_steps and step + 1 >= max_steps:
                break
            if budget_s is not None and time.monotonic() - started > budget_s:
                break
        mean_loss = reduce_mean(float(np.mean(losses)) if losses else math.nan, hooks)
        if hooks.is_main:
            log.info(
                "%s epoch %d/%d: loss %.4f (%.0f s)", name, epoch + 1, epochs, mean_loss, time.monotonic() - started
            )
        if on_epoch:
            on_epoch(epoch, mean_loss)
        if budget_s is not None and time.monotonic() - started > budget_s:
            if hooks.is_main:
                log.info("%s: time budget of %.0f s reached after epoch %d", name, budget_s, epoch + 1)
            break


def validate(model: nn.Module, valid: dict, batch_size: int) -> dict[str, float | None]:
    """Image/pixel AUROC of the network alone (no head) on the validation split."""
    results = Scorer(model, NetworkOnlyHead()).score_images(valid["images"], batch_size)
    out: dict[str, float | None] = {"val_image_auroc": None, "val_pixel_auroc": None}
    labels = valid["labels"]
    if 0 < labels.sum() < len(labels):
        out["val_image_auroc"] = metrics.image_auroc(labels, np.array([r.raw_score for r in results]))
    if valid["masks"] is not None and labels.sum():
        out["val_pixel_auroc"] = metrics.pixel_auroc(valid["masks"], [r.raw_map for r in results])
    return out


def format_row(row: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())

"""Building blocks of a family's gradient stages: the epoch loop, validation, model selection.

A family's ``train(model, ctx)`` (e.g. :mod:`adcore.models.fusion.train`) composes these;
:class:`TrainContext` is everything the generic loop hands it.

:func:`run_stage` is device-aware (batches, loss and optimiser on ``ctx.device``; autocast
on CUDA, bf16 where the GPU supports it, else fp16 with a ``GradScaler``), runs the same
number of steps on every rank and agrees every early stop across ranks
(:mod:`adcore.training.dist`), and checkpoints after every epoch: trainable weights,
optimiser, scheduler, scaler, every rank's RNG state, the stage and its epoch, so a resumed
run continues the same schedule (no second warm-up).
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
from adcore.training import dist

log = logging.getLogger("adcore.train")

STATE_FORMAT = 2  # checkpoint layout written by run_stage (1: weights and epoch only)
SMOKE_STEPS = 2  # --smoke-test: steps per epoch


@dataclass
class TrainContext:
    """What the generic loop hands a family's gradient stages.

    Attributes:
        cfg: The run's ``TrainConfig``.
        hooks: ``TrainHooks`` (rank, device, DDP wrapping, reporting, resume state).
        batches: This rank's ``SyntheticAnomalyBatches``.
        valid: The validation split (``load_split``): images, labels, masks.
        started: ``time.monotonic()`` at the start of the run (a resumed run: minus the time already spent).
        history: Per-epoch rows; the family appends, the artifact keeps them.
        stages_done: Names of the gradient stages finished (restored on resume).
        device: Where the model, batches and loss live.
    """

    cfg: Any
    hooks: Any
    batches: Any
    valid: dict
    started: float
    history: list[dict] = field(default_factory=list)
    stages_done: list[str] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def resume(self) -> dict:
        return self.hooks.resume or {}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def resume_for(self, stage: str) -> dict | None:
        """The checkpointed state of ``stage`` when the run resumes inside it, else None."""
        state = self.resume
        return state if state.get("format") == STATE_FORMAT and state.get("stage") == stage else None

    def finished(self, stage: str) -> bool:
        return stage in self.stages_done


def reduce_mean(value: float, hooks) -> float:
    """Mean of ``value`` over the ranks (NaN on a rank that measured nothing is left out)."""
    return dist.mean(value, hooks.world_size)


def autocast_settings(device: torch.device, enabled: bool) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed): bf16 on CUDA where supported, else fp16."""
    if not enabled or device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


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
    on_epoch: Callable[[int, float], dict | None] | None = None,
    state_fn: Callable[[], dict] | None = None,
) -> None:
    """AdamW with linear warm-up over ``epochs`` passes of ``ctx.batches``, within ``budget_s``.

    ``on_epoch(epoch, mean_loss)`` returns the epoch's metrics row (default: stage, epoch,
    loss); it is appended to ``ctx.history`` and reported with a checkpoint holding
    ``state_fn()`` (the family's part: its weights, model selection) plus the stage's state.
    A run resumed inside this stage (``ctx.resume_for(name)``) restores optimiser, scheduler,
    scaler, RNG states, elapsed time and budget, and continues after the saved epoch.
    """
    cfg, hooks, batches, world = ctx.cfg, ctx.hooks, ctx.batches, ctx.hooks.world_size
    device = ctx.device
    wrapped = hooks.wrap(module)
    dtype, use_scaler = autocast_settings(device, getattr(cfg, "mixed_precision", True))
    # Equal steps on every rank: each step is a DDP all-reduce, a rank with one more would wait forever.
    steps = dist.min_int(len(batches), world)
    if cfg.smoke_test:
        steps = min(steps, SMOKE_STEPS)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = max(1, epochs * steps)
    warm = max(1, int(total * warmup_share)) if warmup_share else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start_epoch, spent = 0, 0.0
    saved = ctx.resume_for(name)
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if use_scaler and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        rngs = saved.get("rng") or []
        if len(rngs) == world:
            dist.set_rng_state(rngs[hooks.rank])
        elif hooks.is_main:
            log.warning("%s: checkpoint has RNG states of %d ranks, this run has %d", name, len(rngs), world)
        start_epoch, spent, budget_s = int(saved["epoch"]), float(saved["stage_elapsed_s"]), saved["budget_s"]
    if hooks.is_main and dtype is not None:
        log.info("%s: autocast %s on %s%s", name, dtype, device, " with GradScaler" if use_scaler else "")
    started = time.monotonic() - spent

    def over_budget() -> bool:
        return budget_s is not None and time.monotonic() - started > budget_s

    for epoch in range(start_epoch, epochs):
        wrapped.train()
        loss_sum, done = torch.zeros((), dtype=torch.float64, device=device), 0
        batch_iter = iter(batches.epoch(epoch))
        for _ in range(steps):
            batch = next(batch_iter).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = step_fn(wrapped, batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += loss.detach().double()
            done += 1
            # Every rank asks, so every rank makes the same collective calls and stops at the same step.
            if budget_s is not None and dist.agree_stop(over_budget(), world):
                break
        mean_loss = reduce_mean(float(loss_sum.item()) / done if done else math.nan, hooks)
        if hooks.is_main:
            log.info(
                "%s epoch %d/%d: loss %.4f (%.0f s)", name, epoch + 1, epochs, mean_loss, time.monotonic() - started
            )
        row = on_epoch(epoch, mean_loss) if on_epoch else None
        row = row or {"stage": name, "epoch": epoch + 1, "loss": mean_loss, "elapsed_s": round(ctx.elapsed(), 1)}
        row["steps"] = done  # the same on every rank
        if on_epoch is None:
            ctx.history.append(row)
        stop = budget_s is not None and dist.agree_stop(over_budget(), world)
        if stop or epoch + 1 == epochs:
            ctx.stages_done.append(name)
        rngs = dist.gather_objects(dist.rng_state(), world)  # every rank's, for rank 0's checkpoint

        def checkpoint(done_epochs=epoch + 1, rngs=rngs) -> dict:
            return {
                "format": STATE_FORMAT,
                "stage": name,
                "epoch": done_epochs,
                "epochs": epochs,
                "stages_done": list(ctx.stages_done),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rngs,
                "budget_s": budget_s,
                "stage_elapsed_s": time.monotonic() - started,
                "elapsed_s": ctx.elapsed(),
                "history": list(ctx.history),
                **(state_fn() if state_fn else {}),
            }

        hooks.report({**row, "epochs": epochs}, checkpoint)
        if stop:
            if hooks.is_main:
                log.info("%s: time budget of %.0f s reached after epoch %d", name, budget_s, epoch + 1)
            break
    if name not in ctx.stages_done:  # e.g. resumed after its last epoch
        ctx.stages_done.append(name)


def validate(model: nn.Module, valid: dict, batch_size: int, world_size: int | None = None) -> dict[str, float | None]:
    """Image/pixel AUROC of the network alone (no head) on the validation split.

    Given ``world_size`` (every rank must then call it), the figures are averaged over the
    ranks (they differ only by floating-point noise), so model selection decides alike everywhere.
    """
    results = Scorer(model, NetworkOnlyHead()).score_images(valid["images"], batch_size)
    out: dict[str, float | None] = {"val_image_auroc": None, "val_pixel_auroc": None}
    labels = valid["labels"]
    if 0 < labels.sum() < len(labels):
        out["val_image_auroc"] = metrics.image_auroc(labels, np.array([r.raw_score for r in results]))
    if valid["masks"] is not None and labels.sum():
        out["val_pixel_auroc"] = metrics.pixel_auroc(valid["masks"], [r.raw_map for r in results])
    if world_size is None:
        return out
    return {k: dist.mean(v, world_size) for k, v in out.items()}


def format_row(row: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())

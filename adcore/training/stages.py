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

import itertools
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
        skipped: The rank's ``SkippedImages`` of the train split, checked against their share after
            every epoch (None: nothing checked).
    """

    cfg: Any
    hooks: Any
    batches: Any
    valid: dict
    started: float
    history: list[dict] = field(default_factory=list)
    stages_done: list[str] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    skipped: Any = None

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
    epochs: int | None,
    lr: float,
    step_fn: Callable[[nn.Module, Any], torch.Tensor],
    budget_s: float | None,
    warmup_share: float = 0.0,
    on_epoch: Callable[[int, float], dict | None] | None = None,
    state_fn: Callable[[], dict] | None = None,
) -> None:
    """AdamW with linear warm-up over ``epochs`` passes of ``ctx.batches``, within ``budget_s``;
    ``epochs`` None: passes until ``budget_s`` is spent (the warm-up then takes its share of the
    steps the budget is estimated to allow, :class:`WarmUp`).

    ``on_epoch(epoch, mean_loss)`` returns the epoch's metrics row (default: stage, epoch,
    loss); it is appended to ``ctx.history`` and reported with a checkpoint holding
    ``state_fn()`` (the family's part: its weights, model selection) plus the stage's state.
    A run resumed inside this stage (``ctx.resume_for(name)``) restores optimiser, scheduler,
    scaler, RNG states, elapsed time and budget, and continues after the saved epoch.

    Every ``cfg.checkpoint_every_min`` minutes inside an epoch it also reports a checkpoint (metrics:
    stage, epoch, ``step``); a run resumed from one replays the epoch's batches up to that step and
    continues with the same losses as a run never stopped.
    """
    cfg, hooks, batches, world = ctx.cfg, ctx.hooks, ctx.batches, ctx.hooks.world_size
    device = ctx.device
    wrapped = hooks.wrap(module)
    dtype, use_scaler = autocast_settings(device, getattr(cfg, "mixed_precision", True))
    # Equal steps on every rank: each step is a DDP all-reduce, a rank with one more would wait forever.
    steps = dist.min_int(len(batches), world)
    if cfg.smoke_test:
        steps = min(steps, SMOKE_STEPS)
    if epochs is None and budget_s is None:
        raise ValueError(f"{name}: neither a number of epochs nor a time budget")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = WarmUp(warmup_share, epochs * steps if epochs is not None else None, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start_epoch, start_step, start_loss, spent = 0, 0, 0.0, 0.0
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
        # A checkpoint taken inside an epoch: its steps done and their loss so far.
        start_step, start_loss = int(saved.get("step", 0)), float(saved.get("epoch_loss_sum", 0.0))
    if hooks.is_main and dtype is not None:
        log.info("%s: autocast %s on %s%s", name, dtype, device, " with GradScaler" if use_scaler else "")
    started = time.monotonic() - spent
    every_s = _checkpoint_interval_s(cfg)
    last_checkpoint = time.monotonic()

    def over_budget() -> bool:
        return budget_s is not None and time.monotonic() - started > budget_s

    def checkpoint_state(epochs_done: int, rngs: list, step: int = 0, loss_sum: float = 0.0) -> Callable[[], dict]:
        def state() -> dict:
            return {
                "format": STATE_FORMAT,
                "stage": name,
                "epoch": epochs_done,
                "step": step,  # steps done in the epoch after ``epoch`` (0: at an epoch's end)
                "epoch_loss_sum": loss_sum,
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

        return state

    for epoch in range(start_epoch, epochs) if epochs is not None else itertools.count(start_epoch):
        wrapped.train()
        skip, start_step = start_step, 0
        loss_sum, done = torch.tensor(start_loss if skip else 0.0, dtype=torch.float64, device=device), skip
        batch_iter = iter(batches.epoch(epoch))
        for _ in range(skip):  # resumed inside this epoch: the same batches again, up to where it stopped
            next(batch_iter)
        for _ in range(skip, steps):
            step_started = time.monotonic()
            batch = next(batch_iter).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = step_fn(wrapped, batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach().double()
            done += 1
            if warm.wants_estimate(epoch, done):  # every rank at the same step: the mean is a collective
                warm.estimate(sched.last_epoch, dist.mean(time.monotonic() - step_started, world), budget_s)
            sched.step()
            # Every rank asks, so every rank makes the same collective calls, stops at the same step and
            # checkpoints at the same step.
            due = every_s is not None and time.monotonic() - last_checkpoint >= every_s
            stop, save = (
                dist.agree_flags([over_budget(), due and done < steps], world)
                if budget_s is not None or every_s is not None
                else (False, False)
            )
            if stop:
                break
            if save:
                rngs = dist.gather_objects(dist.rng_state(), world)
                state = checkpoint_state(epoch, rngs, done, float(loss_sum.item()))
                hooks.report({"stage": name, "epoch": epoch + 1, "step": done, "steps": steps}, state)
                last_checkpoint = time.monotonic()
        mean_loss = reduce_mean(float(loss_sum.item()) / done if done else math.nan, hooks)
        if ctx.skipped is not None:  # every rank, after every epoch: too many unreadable images end the run
            ctx.skipped.check(world)
        if hooks.is_main:  # a stage with on_epoch logs its own row (loss and validation)
            of = f"/{epochs}" if epochs is not None else ""
            level = logging.DEBUG if on_epoch else logging.INFO
            seconds = time.monotonic() - started
            log.log(level, "%s epoch %d%s: loss %.4f (%.0f s)", name, epoch + 1, of, mean_loss, seconds)
        row = on_epoch(epoch, mean_loss) if on_epoch else None
        row = row or {"stage": name, "epoch": epoch + 1, "loss": mean_loss, "elapsed_s": round(ctx.elapsed(), 1)}
        row["steps"] = done  # the same on every rank
        if on_epoch is None:
            ctx.history.append(row)
        stop = budget_s is not None and dist.agree_stop(over_budget(), world)
        if stop or epoch + 1 == epochs:
            ctx.stages_done.append(name)
        rngs = dist.gather_objects(dist.rng_state(), world)  # every rank's, for rank 0's checkpoint
        hooks.report({**row, "epochs": epochs}, checkpoint_state(epoch + 1, rngs))
        last_checkpoint = time.monotonic()
        if stop:
            if hooks.is_main:
                log.info("%s: time budget of %.0f s reached after epoch %d", name, budget_s, epoch + 1)
            break
    if name not in ctx.stages_done:  # e.g. resumed after its last epoch
        ctx.stages_done.append(name)


def _checkpoint_interval_s(cfg) -> float | None:
    """Seconds between checkpoints inside an epoch (``checkpoint_every_min``; None: at epoch ends only)."""
    minutes = getattr(cfg, "checkpoint_every_min", None)
    return None if minutes is None else 60.0 * minutes


class WarmUp:
    """The learning-rate factor of a linear warm-up over ``share`` of a stage's steps (LambdaLR's lambda).

    With a number of epochs the stage's steps are known. When the time budget ends the stage they are
    not: the warm-up starts over one epoch's steps and is sized, after the second step (the first pays
    one-time costs), from that step's duration (averaged over the ranks, so every rank schedules alike)
    and the budget. Its state is saved with the scheduler's (LambdaLR keeps a callable object's
    attributes), so a resumed run keeps it.
    """

    ESTIMATE_AT_STEP = 2

    def __init__(self, share: float, total_steps: int | None, epoch_steps: int):
        self.share = share
        self.estimated = total_steps is not None or not share
        self.steps = max(1, int((total_steps or epoch_steps) * share)) if share else 0

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps) if self.steps else 1.0

    def wants_estimate(self, epoch: int, steps_done: int) -> bool:
        return not self.estimated and epoch == 0 and steps_done == self.ESTIMATE_AT_STEP

    def estimate(self, step: int, step_s: float, budget_s: float) -> None:
        """Size the warm-up as ``share`` of the steps ``budget_s`` allows at ``step_s`` each (never shorter
        than the steps already taken)."""
        self.estimated = True
        allowed = budget_s / max(step_s, 1e-6)
        self.steps = max(step + 1, int(allowed * self.share), 1)


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

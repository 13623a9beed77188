"""DRA's gradient stage (official ``train.py``): Adam, StepLR, gradient clipping, the four deviation losses.

Before the first step the ``n_ref`` reference normals are fixed (seeded) and stay in the weights; after
the last, under ``normalise_heads``, each head's score range on the validation split becomes its
normalisation (never the test split); by default the heads are summed raw, as the official code does.
Hyperparameters come from the model's ``DRAConfig`` (the paper's values; override them with
``--overrides '{"epochs": 5}'``); the run's ``--minutes``, ``--seed`` and ``--smoke-test`` apply.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from adcore.models.dra.batches import BalancedBatches
from adcore.models.dra.config import HEADS
from adcore.models.dra.fit import choose_references
from adcore.models.dra.loss import dra_loss
from adcore.scorer import prepare
from adcore.training import dist
from adcore.training.stages import STATE_FORMAT, TrainContext, autocast_settings, format_row, reduce_mean, validate

log = logging.getLogger("adcore.train")

SMOKE_STEPS = 2  # --smoke-test: steps of one epoch
STAGE = "dra"  # the stage's name in checkpoints and ``ctx.stages_done``


class _HeadScores(nn.Module):
    """The training forward as a module of its own, so DDP wraps it: images -> raw head scores [B, 4]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.head_outputs(images)[0]


@torch.no_grad()
def fit_normalisation(model, images: list[np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Set each head's min/max over ``images`` (the validation split) as its normalisation."""
    model.eval()
    scores = []
    for start in range(0, len(images), batch_size):
        chunk = np.stack([prepare(im, model.input_size) for im in images[start : start + batch_size]])
        device = next(model.parameters()).device
        scores.append(model.head_outputs(torch.from_numpy(chunk).to(device))[0].float().cpu())
    s = torch.cat(scores)  # [N, 4]
    model.set_normalisation(s.min(0).values.to(model.head_lo), s.max(0).values.to(model.head_lo))
    return model.head_lo.cpu().numpy(), model.head_hi.cpu().numpy()


def train_dra(model, ctx: TrainContext) -> dict:
    """The DRA stage; returns what the artifact's training summary adds. Checkpoints after every epoch
    in the loop's checkpoint layout (``STATE_FORMAT``); a resumed run continues after the saved epoch."""
    cfg, run, hooks, device = model.cfg, ctx.cfg, ctx.hooks, ctx.device
    world = hooks.world_size
    pixels, labels = ctx.batches.pixels, np.asarray(ctx.batches.labels)
    batches = BalancedBatches(pixels, labels, cfg, seed=[run.seed, hooks.rank])
    if not model.has_references():  # a resumed run has its references in the restored weights
        choose_references(model, pixels, labels, run.seed)
    net = hooks.wrap(_HeadScores(model))
    params = model.trainable_parameters()
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
    dtype, use_scaler = autocast_settings(device, getattr(run, "mixed_precision", True))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    draws = torch.Generator().manual_seed(run.seed * 1009 + hooks.rank)  # the deviation loss's N(0, 1) reference
    saved, start_epoch = ctx.resume_for(STAGE), 0
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if use_scaler and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        rngs = saved.get("rng") or []
        if len(rngs) == world:  # this rank's global RNGs and its deviation-loss draws continue
            dist.set_rng_state(rngs[hooks.rank])
            draws.set_state(rngs[hooks.rank]["draws"])
        elif hooks.is_main:
            log.warning("DRA: checkpoint has RNG states of %d ranks, this run has %d", len(rngs), world)
        start_epoch = int(saved["epoch"])
    epochs, steps = (1, SMOKE_STEPS) if run.smoke_test else (cfg.epochs, cfg.steps_per_epoch)
    budget, started, done = run.budget_s(2, ctx.elapsed()), time.monotonic(), 0

    def over_budget() -> bool:  # every rank asks, so every rank stops at the same step
        return budget is not None and dist.agree_stop(time.monotonic() - started > budget, world)

    for epoch in range(start_epoch, 0 if ctx.finished(STAGE) else epochs):
        net.train()
        losses, stop = [], False
        for batch in batches.epoch(epoch, steps):  # the same number of steps on every rank
            ref = torch.randn(cfg.ref_draws, generator=draws).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                scores = net(batch.images.to(device, non_blocking=True))
            # The deviation loss in float32: its margins and N(0, 1) statistics are small differences.
            loss, parts = dra_loss(scores.float(), batch.labels.to(device), ref, cfg.margin)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
            done += 1
            stop = over_budget()
            if stop:
                break
        sched.step()
        model.eval()
        row = {"stage": STAGE, "epoch": epoch + 1, "loss": reduce_mean(float(np.mean(losses)), hooks)}
        row |= {f"loss_{k}": v for k, v in parts.items()}
        row |= validate(model, ctx.valid, run.batch_size, world)
        row["elapsed_s"] = round(ctx.elapsed(), 1)
        ctx.history.append(row)
        if stop or epoch + 1 == epochs:
            ctx.stages_done.append(STAGE)
        if hooks.is_main:
            log.info("DRA epoch %d/%d: %s", epoch + 1, epochs, format_row(row))

        rngs = dist.gather_objects({**dist.rng_state(), "draws": draws.get_state()}, world)

        def checkpoint(done_epochs=epoch + 1, rngs=rngs) -> dict:
            return {
                "format": STATE_FORMAT,
                "stage": STAGE,
                "epoch": done_epochs,
                "stages_done": list(ctx.stages_done),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else None,
                "rng": rngs,
                "elapsed_s": ctx.elapsed(),
                "history": list(ctx.history),
                "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            }

        hooks.report({**row, "epochs": epochs}, checkpoint)
        if stop:
            if hooks.is_main:
                log.info("DRA: time budget of %.0f s reached after epoch %d (%d steps)", budget, epoch + 1, done)
            break
    if STAGE not in ctx.stages_done:
        ctx.stages_done.append(STAGE)
    summary = {"dra_steps": done, "labelled_anomalies": int((labels == 1).sum())}
    if not cfg.normalise_heads:
        return summary
    lo, hi = fit_normalisation(model, ctx.valid["images"], run.batch_size)
    if hooks.is_main:
        log.info("DRA head normalisation (validation min/max): %s", dict(zip(HEADS, zip(lo.round(4), hi.round(4)))))
    return summary | {"head_lo": lo.tolist(), "head_hi": hi.tolist()}

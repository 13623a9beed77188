"""Training as a library function: the paper's stages in order, one process or many.

Stages (papers.md section 1):
1. the domain tower fine-tuned as a binary normal/anomalous classifier
   (AdamW lr 5e-5, focal loss, 5% warm-up) on normal + synthesised anomalies;
2. adapters, projection and the vision tower's last layer trained with
   BCE + Dice + Focal; an epoch ends with validation image/pixel AUROC;
3. the head: VAE centroids from patch embeddings (fusion) or the coreset
   memory bank (PatchCore); a function call without gradients, not an epoch;
4. calibration on the validation split (never the test split).

Distribution is injected through :class:`TrainHooks` (``jobs/train.py`` passes
Ray Train's DDP wrapping, sharding and reporting), so this module never imports Ray.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adcore import metrics
from adcore.calibration import fit_calibration
from adcore.data import bmad
from adcore.layers.losses import focal_loss, fusion_loss
from adcore.models import AnomalyModel, create
from adcore.scorer import Scorer
from adcore.training.data import SyntheticAnomalyBatches, load_images
from adcore.training.heads import build_head
from adcore.training.predict import predict

log = logging.getLogger("adcore.train")


@dataclass
class TrainConfig:
    model: str = "fusion-small"
    weights: dict[str, str] = field(default_factory=dict)  # tower -> local folder or s3:// prefix
    epochs: int = 4
    minutes: float | None = None  # wall-clock budget for the gradient stages (1 and 2)
    batch_size: int = 8
    lr: float = 1e-3  # adapters and projection
    domain_lr: float = 5e-5  # paper, stage 1
    domain_epochs: int = 1
    warmup_share: float = 0.05  # paper, stage 1; stage 2 uses it too (large early logits otherwise)
    anomaly_share: float = 0.5  # share of normal training images given a synthetic anomaly
    mask_size: int = 56  # resolution of the segmentation loss (maps upsampled, masks area-pooled)
    max_valid: int = 200  # validation images used per epoch and for calibration
    target_sensitivity: float = 0.95
    version: int = 1
    seed: int = 0
    smoke_test: bool = False  # a few steps on a few images, to check the plumbing
    tiny: bool = False  # the preset's tiny random-init variant (tests)
    overrides: dict[str, Any] = field(default_factory=dict)  # model config overrides

    def budget_s(self, stage: int, elapsed_s: float = 0.0) -> float | None:
        """Stage 1 gets at most a fifth of ``minutes``; stage 2 whatever is left of 85 % of it
        after ``elapsed_s`` (the last 15 % is for centroids/memory bank and calibration)."""
        if self.minutes is None:
            return None
        total = self.minutes * 60
        return 0.2 * total if stage == 1 else max(0.0, 0.85 * total - elapsed_s)


@dataclass
class TrainHooks:
    """How a caller (e.g. Ray Train) joins in: sharding, DDP wrapping, reporting."""

    rank: int = 0
    world_size: int = 1
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m
    report: Callable[[dict[str, Any], Callable[[], dict] | None], None] = lambda metrics, state: None
    resume: dict | None = None  # a state produced by the state callback of an earlier report

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _DomainClassifier(nn.Module):
    """Stage 1 as a module of its own, so DDP sees the forward it must sync."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.domain_logit(images)


def _trained_names(model: nn.Module) -> set[str]:
    """Parameters any stage trains (stage 1's domain layers too), for checkpoints."""
    names = set()
    for stage in (1, 2):
        model.freeze_for_stage(stage)
        names |= {n for n, p in model.named_parameters() if p.requires_grad}
    return names


def _trainable_state(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names or k == "anchors"}


def _reduce_mean(value: float, hooks: TrainHooks) -> float:
    if hooks.world_size > 1 and torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / hooks.world_size
    return value


def _run_stage(
    name: str,
    module: nn.Module,
    params: list[nn.Parameter],
    batches: SyntheticAnomalyBatches,
    epochs: int,
    lr: float,
    step_fn: Callable[[nn.Module, Any], torch.Tensor],
    cfg: TrainConfig,
    hooks: TrainHooks,
    budget_s: float | None,
    warmup_share: float = 0.0,
    start_epoch: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> None:
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
        mean_loss = _reduce_mean(float(np.mean(losses)) if losses else math.nan, hooks)
        if hooks.is_main:
            log.info("%s epoch %d/%d: loss %.4f (%.0f s)", name, epoch + 1, epochs, mean_loss, time.monotonic() - started)
        if on_epoch:
            on_epoch(epoch, mean_loss)
        if budget_s is not None and time.monotonic() - started > budget_s:
            if hooks.is_main:
                log.info("%s: time budget of %.0f s reached after epoch %d", name, budget_s, epoch + 1)
            break


def _fusion_step(mask_size: int):
    def step(model: nn.Module, batch) -> torch.Tensor:
        out = model(batch.images)
        logits = F.interpolate(out.map_logit[:, None], size=(mask_size, mask_size), mode="bilinear", align_corners=False)
        target = F.interpolate(batch.masks[:, None], size=(mask_size, mask_size), mode="area")
        return fusion_loss(out.image_logit, logits[:, 0], batch.labels, (target[:, 0] >= 0.5).float())["loss"]

    return step


def _domain_step(model: nn.Module, batch) -> torch.Tensor:
    return focal_loss(model(batch.images), batch.labels)


def _fmt(row: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def validate(model: AnomalyModel, valid: dict, batch_size: int) -> dict[str, float | None]:
    """Image/pixel AUROC of the network alone (no head) on the validation split."""
    scorer = Scorer(model, head=lambda out: (out["score"], out["anomaly_map"]))
    res = predict(scorer, valid["images"], batch_size)
    out: dict[str, float | None] = {"val_image_auroc": None, "val_pixel_auroc": None}
    labels = valid["labels"]
    if 0 < labels.sum() < len(labels):
        out["val_image_auroc"] = metrics.image_auroc(labels, res["scores"])
    if valid["masks"] is not None and labels.sum():
        out["val_pixel_auroc"] = metrics.pixel_auroc(valid["masks"], res["maps"])
    return out


def load_split(data: str, split: str, limit: int | None, rank: int = 0, world_size: int = 1) -> dict:
    samples = bmad.list_split(data, split)
    if limit is not None and len(samples) > limit:
        step = len(samples) / limit  # even spread keeps both classes
        samples = [samples[int(i * step)] for i in range(limit)]
    samples = samples[rank::world_size]
    images, masks, labels = load_images(samples)
    has_masks = bmad.has_masks(samples)
    if has_masks:
        masks = [m if m is not None else np.zeros(im.shape[:2], bool) for m, im in zip(masks, images)]
    return {"samples": samples, "images": images, "masks": masks if has_masks else None, "labels": labels}


def train(data: str, cfg: TrainConfig, output: str | None = None, hooks: TrainHooks | None = None) -> Scorer:
    """Train ``cfg.model`` on a BMAD-layout folder; save the artifact to ``output`` (main rank)."""
    hooks = hooks or TrainHooks()
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()
    model = create(cfg.model, weights=cfg.weights or None, tiny=cfg.tiny, **cfg.overrides)
    limit = 8 if cfg.smoke_test else None
    train_set = load_split(data, "train", limit, hooks.rank, hooks.world_size)
    valid = load_split(data, "valid", 8 if cfg.smoke_test else cfg.max_valid)
    batches = SyntheticAnomalyBatches(
        train_set["images"], train_set["masks"] or [None] * len(train_set["images"]), train_set["labels"],
        model.input_size, cfg.batch_size, cfg.anomaly_share, seed=cfg.seed + 1000 * hooks.rank,
    )
    resume = hooks.resume or {}
    history: list[dict] = list(resume.get("history", []))  # epochs before the resumed checkpoint
    if resume.get("model"):
        model.load_state_dict(resume["model"], strict=False)
    if model.head_kind == "centroids":
        if resume.get("stage", 0) < 1:
            model.freeze_for_stage(1)
            _run_stage(
                "domain", _DomainClassifier(model), model.trainable_parameters(), batches, cfg.domain_epochs,
                cfg.domain_lr, _domain_step, cfg, hooks, cfg.budget_s(1), cfg.warmup_share,
            )
        trained = _trained_names(model)  # leaves stage 2's parameters trainable
        best = resume.get("best") or {"score": -math.inf, "epoch": None, "model": None}

        def keep_if_best(row: dict) -> None:
            """Model selection on the validation split (never the test split): mean of its AUROCs."""
            aurocs = [row[k] for k in ("val_image_auroc", "val_pixel_auroc") if row.get(k) is not None]
            if aurocs and float(np.mean(aurocs)) > best["score"]:
                best.update(score=float(np.mean(aurocs)), epoch=row["epoch"], model=_trainable_state(model, trained))

        def on_epoch(epoch: int, loss: float) -> None:
            model.eval()
            row = {"stage": "fusion", "epoch": epoch + 1, "loss": loss, **validate(model, valid, cfg.batch_size)}
            row["elapsed_s"] = round(time.monotonic() - t0, 1)
            history.append(row)
            keep_if_best(row)
            if hooks.is_main:
                log.info("validation after epoch %d: %s", epoch + 1, _fmt(row))
            hooks.report(
                row,
                lambda: {"stage": 1, "epoch": epoch + 1, "model": _trainable_state(model, trained), "history": history, "best": best},
            )

        start_epoch = int(resume.get("epoch", 0))
        if start_epoch == 0:  # the adapters as initialised are a candidate too
            row = {"stage": "fusion", "epoch": 0, "loss": None, **validate(model.eval(), valid, cfg.batch_size)}
            history.append(row)
            keep_if_best(row)
            if hooks.is_main:
                log.info("validation before stage 2: %s", _fmt(row))
        _run_stage(
            "fusion", model, model.trainable_parameters(), batches, cfg.epochs, cfg.lr, _fusion_step(cfg.mask_size),
            cfg, hooks, cfg.budget_s(2, time.monotonic() - t0), cfg.warmup_share, start_epoch=start_epoch, on_epoch=on_epoch,
        )
        if best["model"] is not None:
            model.load_state_dict(best["model"], strict=False)
            if hooks.is_main:
                log.info("keeping the weights of epoch %s (validation AUROC %.4f)", best["epoch"], best["score"])
    model.eval()
    head = build_head(model, batches, cfg, hooks)
    scorer = Scorer(model, head)
    res = predict(scorer, valid["images"], cfg.batch_size)
    scorer.calibration = fit_calibration(
        valid["labels"], res["scores"], valid["masks"], res["maps"] if valid["masks"] is not None else None,
        target_sensitivity=cfg.target_sensitivity,
    )
    summary = {"config": asdict(cfg), "history": history, "train_images": len(train_set["images"]) * hooks.world_size}
    if model.head_kind == "centroids":
        summary["selected_epoch"] = best["epoch"]
    summary["seconds"] = round(time.monotonic() - t0, 1)
    if output and hooks.is_main:
        scorer.save(output, model_name=cfg.model, version=cfg.version, extra=summary)
        log.info("saved %s (%s) in %.0f s", output, scorer.version, summary["seconds"])
    return scorer

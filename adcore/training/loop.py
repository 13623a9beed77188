"""Training as a library function: a family's gradient stages, its head, calibration.

1. the family's gradient stages, when it has some (``MethodFamily.train``; the
   fusion model's two stages live in ``adcore/models/fusion/train.py``);
2. the head: ``MethodFamily.fit`` builds what the FAISS stage matches against
   (VAE centroids, a coreset memory bank): a function call without gradients;
3. the head's settings that it offers to choose on the validation split (``adcore.training.select``);
4. calibration on the validation split (never the test split).

Distribution is injected through :class:`TrainHooks` (``jobs/train.py`` passes
Ray Train's DDP wrapping, sharding and reporting), so this module never imports Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from adcore.calibration import fit_calibration
from adcore.cli import hidden, one_of
from adcore.data import bmad
from adcore.data.errors import DatasetLayoutError, DecodeError
from adcore.errors import FlagError
from adcore.models import create, family, family_for, list_models, preset
from adcore.models.family import SCHEDULE_FLAGS
from adcore.models.registry import merge_config
from adcore.prompts import list_domains
from adcore.scorer import Scorer
from adcore.training import dist
from adcore.training.data import SyntheticAnomalyBatches, load_images
from adcore.training.fit import FIT_MAX_PATCHES, FitData, gather_across_ranks
from adcore.training.select import select_on_validation
from adcore.training.skipped import MAX_BAD_SHARE, SkippedImages, read_with_retries, reason_of
from adcore.training.stages import STATE_FORMAT, TrainContext
from adcore.training.stream import pick_samples

log = logging.getLogger("adcore.train")

SMOKE_IMAGES = 8  # images per split in a smoke test
SMOKE_EPOCHS = 2  # a smoke test's epochs per stage unless --epochs says otherwise (two: the epoch loop is exercised)
# Wall-clock budget of the gradient stages unless --minutes says otherwise: the budget the benchmarks' figures
# were measured with, so the default command gives them.
DEFAULT_MINUTES = 10.0


@dataclass
class TrainConfig:
    preset: str = one_of(list_models, "preset", "fusion-small")  # registered model to train
    weights: dict[str, str] = field(default_factory=dict)  # tower -> local folder or s3:// prefix
    epochs: int | None = None  # gradient-stage epochs; default: as many as --minutes allows (best epoch kept)
    minutes: float | None = DEFAULT_MINUTES  # time budget of the gradient stages (library: None = --epochs alone)
    batch_size: int = 8
    lr: float = 1e-3  # adapters and projection
    domain_lr: float = 5e-5  # paper, stage 1
    domain_epochs: int = 1
    warmup_share: float = 0.05  # paper, stage 1; stage 2 uses it too (large early logits otherwise)
    anomaly_share: float = 0.5  # share of normal training images given a synthetic anomaly
    labelled: int = 0  # labelled anomalies drawn (with --seed) from train/Ungood/img; DRA needs >= 1 (paper: 1 or 10)
    mask_size: int = 56  # resolution of the segmentation loss (maps upsampled, masks area-pooled)
    max_valid: int = 200  # validation images used per epoch and for calibration
    max_bad_share: float = MAX_BAD_SHARE  # share of unreadable training images skipped before the run is refused
    fit_max_patches: int = FIT_MAX_PATCHES  # patches per class a rank keeps for the head's fit (sampled beyond)
    target_sensitivity: float = 0.95
    target_specificity: float = 0.99  # thresholds when valid/ has no anomalies: share of normal images below them
    checkpoint_every_min: float = 15.0  # minutes between checkpoints inside an epoch (0: after every step)
    mixed_precision: bool = True  # autocast on CUDA (bf16 where supported, else fp16 + GradScaler); CPU: off
    model_version: int = 1  # the artifact's version number (its model_version is <preset>-v<N>-<fingerprint>)
    seed: int = 0
    smoke_test: bool = False  # a few steps on a few images, to check the plumbing
    tiny: bool = hidden(False)  # the preset's tiny random-init variant (tests)
    # Imaging domain of the text prompts (adcore/prompts/<domain>.json) for presets that use prompts;
    # default: the data's dataset.json "domain", else the preset's own.
    domain: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # model config overrides
    signs: str = ""  # sign-bank file (YAML or JSON) naming the dataset's anomaly categories (SD-MAD)

    def budget_s(self, stage: int, elapsed_s: float = 0.0) -> float | None:
        """Stage 1 gets at most a fifth of ``minutes``; stage 2 whatever is left of 85 % of it
        after ``elapsed_s`` (the last 15 % is for centroids/memory bank and calibration)."""
        if self.minutes is None:
            return None
        total = self.minutes * 60
        return 0.2 * total if stage == 1 else max(0.0, 0.85 * total - elapsed_s)

    def valid_limit(self) -> int:
        """Validation images used: ``max_valid``, or ``SMOKE_IMAGES`` in a smoke test."""
        return SMOKE_IMAGES if self.smoke_test else self.max_valid

    def stage_epochs(self) -> int | None:
        """Epochs of a gradient stage that follows the run's schedule: ``epochs`` when given; else
        None (the time budget ends the stage), or ``SMOKE_EPOCHS`` in a smoke test."""
        if self.epochs is not None:
            return self.epochs
        if self.smoke_test:
            return SMOKE_EPOCHS
        if self.minutes is None:
            raise FlagError("training needs a time budget (--minutes) or a number of epochs (--epochs)")
        return None


@dataclass
class TrainHooks:
    """How a caller (e.g. Ray Train) joins in: sharding, DDP wrapping, reporting."""

    rank: int = 0
    world_size: int = 1
    device: str | torch.device | None = None  # None: CUDA when torch sees it, else the CPU
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m  # e.g. DDP; the module is on ``device`` already
    # Called on every rank after every epoch; the callable builds the checkpoint state (rank 0 saves it).
    report: Callable[[dict[str, Any], Callable[[], dict] | None], None] = lambda metrics, state: None
    resume: dict | None = None  # a state produced by the state callback of an earlier report
    # This rank's training batches when the caller streams them (``adcore.training.stream``), with the
    # number of training images over all ranks; None: the train split is loaded into memory here.
    train_batches: Any = None
    train_images: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def model_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """The run's model config overrides: ``--overrides`` with what ``--signs FILE`` adds."""
    if not cfg.signs:
        return dict(cfg.overrides)
    record = family(preset(cfg.preset)["family"])
    if record.signs is None:
        takes = [n for n in list_models() if family(preset(n)["family"]).signs is not None]
        raise FlagError(f"--signs: preset {cfg.preset!r} has no sign bank (presets that take one: {', '.join(takes)})")
    return merge_config(cfg.overrides, record.signs(cfg.signs))


def refuse_unused_flags(cfg: TrainConfig, given: Iterable[str]) -> None:
    """Refuse the schedule flags in ``given`` (flags a user set) that ``cfg.preset``'s family does not read."""
    record = family(preset(cfg.preset)["family"])
    unused = [name for name in SCHEDULE_FLAGS if name in set(given) and name not in record.train_flags]
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        why = record.own_schedule or f"the {record.name} family's training does not read it"
        raise FlagError(f"{flags}: not used by preset {cfg.preset!r} ({why})")


def load_split(
    data: str,
    split: str,
    limit: int | None,
    rank: int = 0,
    world_size: int = 1,
    labelled: int = 0,
    seed: int = 0,
    skipped: SkippedImages | None = None,
) -> dict:
    """A rank's share of a split, decoded (``pick_samples``). Given ``skipped``, an image that cannot be
    read or decoded is recorded there and left out; without it, it raises."""
    samples = pick_samples(bmad.list_split(data, split, labelled=labelled, seed=seed), split, limit, rank, world_size)
    if skipped is None:
        images, masks, labels = load_images(samples)
    else:
        skipped.expect(len(samples) * world_size)
        samples, images, masks = _load_readable(samples, skipped)
        labels = np.array([s.label for s in samples], dtype=np.int64)
    has_masks = bmad.has_masks(samples)
    if has_masks:
        masks = [m if m is not None else np.zeros(im.shape[:2], bool) for m, im in zip(masks, images)]
    return {"samples": samples, "images": images, "masks": masks if has_masks else None, "labels": labels}


def _load_readable(samples: list[bmad.Sample], skipped: SkippedImages) -> tuple[list, list, list]:
    """The samples whose image (and mask) can be read and decoded, with their pixels; the others to ``skipped``."""
    kept, images, masks = [], [], []
    for sample in samples:
        try:
            image, mask = read_with_retries(lambda _, s=sample: bmad.load_sample(s), str(sample.path))
        except (OSError, DecodeError, DatasetLayoutError) as e:
            skipped.add(str(sample.path), reason_of(e))
            continue
        kept.append(sample)
        images.append(image)
        masks.append(mask)
    return kept, images, masks


def domain_overrides(cfg: TrainConfig, data: str) -> dict[str, Any]:
    """The run's model overrides (:func:`model_overrides`) with the prompts' domain set from
    ``--domain`` or the data's ``dataset.json``."""
    path = family(preset(cfg.preset)["family"]).domain_field
    domain = cfg.domain or bmad.read_domain(data)
    if not path or domain is None:
        if path:
            log.info("prompt domain: the preset's (no --domain, no 'domain' in the data's %s)", bmad.DATASET_FILE)
        return model_overrides(cfg)
    if domain not in list_domains():
        where = "--domain" if cfg.domain else f"{bmad.DATASET_FILE} of {data}"
        raise FlagError(f"{where}: no prompt bank for domain {domain!r}; known: {', '.join(list_domains())}")
    log.info("prompt domain: %s (%s)", domain, "--domain" if cfg.domain else bmad.DATASET_FILE)
    nested: dict[str, Any] = {path[-1]: domain}
    for key in reversed(path[:-1]):
        nested = {key: nested}
    return merge_config(nested, model_overrides(cfg))  # an explicit override of the field still wins


def train(data: str, cfg: TrainConfig, output: str | None = None, hooks: TrainHooks | None = None) -> Scorer:
    """Train ``cfg.preset`` on a BMAD-layout folder; save the artifact to ``output`` (main rank)."""
    hooks = hooks or TrainHooks()
    device = dist.resolve_device(hooks.device)
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()
    model = create(cfg.preset, weights=cfg.weights or None, tiny=cfg.tiny, **domain_overrides(cfg, data))
    family = family_for(model)
    if family.needs_labelled_anomalies and cfg.labelled < 1:
        raise ValueError(
            f"{cfg.preset!r} trains on labelled anomalies: put a few under train/Ungood/img "
            "and pass --labelled N (N >= 1)"
        )
    # Every rank loads the same validation images, so each decides alike on their share.
    valid_skipped = SkippedImages(data, cfg.max_bad_share, split="valid")
    valid = load_split(data, "valid", cfg.valid_limit(), skipped=valid_skipped)
    if hooks.train_batches is not None:
        batches, train_images = hooks.train_batches, hooks.train_images
        skipped = batches.skipped
    else:
        limit = SMOKE_IMAGES if cfg.smoke_test else None
        skipped = SkippedImages(data, cfg.max_bad_share)
        train_set = load_split(data, "train", limit, hooks.rank, hooks.world_size, cfg.labelled, cfg.seed, skipped)
        skipped.check(hooks.world_size)
        batches = SyntheticAnomalyBatches(
            train_set["images"],
            train_set["masks"] or [None] * len(train_set["images"]),
            train_set["labels"],
            model.input_size,
            cfg.batch_size,
            cfg.anomaly_share,
            seed=cfg.seed + 1000 * hooks.rank,
        )
        train_images = len(train_set["images"]) * hooks.world_size
    unmasked = getattr(batches, "image_level_only", 0)
    if unmasked and hooks.is_main:
        log.warning(
            "%d labelled anomalies have no mask: used for image-level supervision only "
            "(never as normal patches, no pixel loss)",
            unmasked,
        )
    resume = hooks.resume or {}
    if resume and resume.get("format") != STATE_FORMAT:
        log.warning("checkpoint of an older layout (no optimiser or stage state): starting afresh")
        resume = hooks.resume = {}
    if resume.get("model"):
        model.load_state_dict(resume["model"], strict=False)
    model.to(device)
    log.info("rank %d/%d trains on %s", hooks.rank, hooks.world_size, device)
    ctx = TrainContext(
        cfg,
        hooks,
        batches,
        valid,
        t0 - float(resume.get("elapsed_s", 0.0)),  # a resumed run keeps its time budget
        history=list(resume.get("history", [])),
        stages_done=list(resume.get("stages_done", [])),
        device=device,
        skipped=skipped,
    )
    summary: dict[str, Any] = {}
    if family.train is not None:
        summary |= family.train(model, ctx)
    model.eval()
    fit_data = FitData(
        batches,
        seed=cfg.seed,
        quick=cfg.smoke_test,
        world_size=hooks.world_size,
        gather=gather_across_ranks(hooks.world_size),
        max_patches=cfg.fit_max_patches,
    )
    scorer = Scorer(model, family.fit(model, fit_data))
    skipped.check(hooks.world_size)  # the fit's pass read every training image
    chosen = select_on_validation(scorer, valid, cfg.batch_size)
    results = scorer.score_images(valid["images"], cfg.batch_size)
    # Maps always: without masks (normal-only or classification-only validation) the pixel
    # normalisation and threshold come from the normal images' maps.
    maps = [r.raw_map for r in results]
    scorer.calibration = fit_calibration(
        valid["labels"],
        np.array([r.raw_score for r in results]),
        valid["masks"],
        maps,
        target_sensitivity=cfg.target_sensitivity,
        target_specificity=cfg.target_specificity,
    )
    summary = {
        "config": asdict(cfg),
        "history": ctx.history,
        "train_images": train_images,
        "skipped_images": {"train": skipped.summary(hooks.world_size), "valid": valid_skipped.summary(None)},
        **summary,
        **({"head_choice": chosen} if chosen else {}),
        **({"image_level_only": unmasked} if unmasked else {}),
    }
    summary["seconds"] = round(time.monotonic() - t0, 1)
    if output and hooks.is_main:
        scorer.save(output, model_name=cfg.preset, version=cfg.model_version, extra=summary)
        log.info("saved %s (%s) in %.0f s", output, scorer.version, summary["seconds"])
    return scorer

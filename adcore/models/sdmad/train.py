"""SD-MAD's two stages on cached frozen features (choices: ``adcore/models/sdmad/model.py``'s docstring).

Stage 1 aligns signs with categories: the vision tower is frozen, so its features (PCA-reduced,
the PCA fitted on the normal training patches) of the normal
training images, of synthetic anomalies made from them (``adcore.training.data.default_makers``:
Perlin textures, foreign patches, CutPaste; never the demo's lesion generator) and of the labelled
shots (each with ``shot_augment`` flipped / rotated copies) are computed once; Adam then trains the
projection, shift adapter, sign shifts, sign weights and the normal logit for ``steps`` steps.
Stage 2 fixes the sign selection: aligned signs from the shots, per-sign normal statistics and the
selection threshold ``z`` from the validation split (never the test split).

The shots' categories come from the dataset's ``categories.csv`` (``adcore.data.bmad``): the
labelled anomalies the loop loaded are listed again with the run's ``--labelled`` and ``--seed``
(the same seeded draw) and checked pixel for pixel against the loaded ones.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adcore.data import bmad
from adcore.scorer import prepare
from adcore.training import dist
from adcore.training.data import default_makers, foreground_mask
from adcore.training.stages import STATE_FORMAT, TrainContext, format_row

log = logging.getLogger("adcore.train")

STAGE = "sdmad"
SMOKE_STEPS = 2
SYNTH_SEED = 7_001  # seed stream of stage 1's synthetic anomalies (beside the run's seed)
ANOMALOUS_PATCH_SHARE = 0.5  # a patch is anomalous when at least half its pixels are in the mask
UNKNOWN_TARGET = -1.0  # patch target of a shot without a mask: left out of the map loss


def dataset_root(sample_path: Path) -> Path:
    """The BMAD root above a split's image (``root/<split>/<good|Ungood>/[img/]x.png``)."""
    for parent in Path(sample_path).parents:
        if parent.name in bmad.SPLITS:
            return parent.parent
    raise ValueError(f"{sample_path} is not inside a BMAD split folder")


def labelled_shots(ctx: TrainContext) -> tuple[Path, list[bmad.Sample]]:
    """The dataset root and the labelled training anomalies the loop loaded, with their categories."""
    root = dataset_root(ctx.valid["samples"][0].path)
    samples = getattr(ctx, "train_samples", None)  # a loop that hands its samples over
    if samples is None:
        samples = bmad.list_split(root, "train", labelled=ctx.cfg.labelled, seed=ctx.cfg.seed)
    return root, [s for s in samples if s.label == 1]


def _check_shots(pixels: list[np.ndarray], labels: np.ndarray, shots: list[bmad.Sample], size: int) -> np.ndarray:
    """Indices of the shots among the loaded pixels (they come last); raises if they are not the same images."""
    idx = np.flatnonzero(labels == 1)
    if len(idx) != len(shots) or (len(idx) and idx[0] != len(labels) - len(idx)):
        raise RuntimeError(f"SD-MAD expected {len(shots)} labelled anomalies after the normals, found {len(idx)}")
    for i, s in zip(idx, shots):
        if not np.allclose(prepare(bmad.load_sample(s)[0], size), pixels[i], atol=1e-4):
            raise RuntimeError(f"labelled anomaly {s.path} is not the image the training loop loaded")
    return idx


def _augment(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` views of [B, 3, S, S]: identity, flips, rotations."""
    views = [x, x.flip(-1), x.flip(-2), x.rot90(1, (-2, -1)), x.rot90(3, (-2, -1)), x.rot90(2, (-2, -1))]
    return views[: max(1, min(n, len(views)))]


def _share(masks: torch.Tensor, grid: int, known: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S, S] masks -> [B, g*g] anomalous patch targets (0/1; -1 on images whose mask is not ``known``)."""
    share = F.adaptive_avg_pool2d(masks[:, None].float(), grid).flatten(1)
    target = (share >= ANOMALOUS_PATCH_SHARE).float()
    if known is None:
        return target
    return torch.where(known[:, None], target, torch.full_like(target, UNKNOWN_TARGET))


@torch.no_grad()
def _features(model, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    out = [model.features(images[i : i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else images.new_zeros(0)


def _synthetic(pixels: list[np.ndarray], seed) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic anomaly per normal image (images [n, 3, S, S], masks [n, S, S])."""
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), SYNTH_SEED])
    others = [p.transpose(1, 2, 0) for p in pixels]
    makers = default_makers(rng, others)
    images, masks = [], []
    for p in pixels:
        img = np.ascontiguousarray(p.transpose(1, 2, 0))
        out, mask = makers[int(rng.integers(len(makers)))](img, foreground=foreground_mask(img))
        images.append(np.asarray(out, np.float32).transpose(2, 0, 1))
        masks.append(np.asarray(mask, np.float32))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))


class _Stage1(nn.Module):
    """The trained part as one module (DDP wraps it): cached features -> evidence without selection."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.evidence(self.model.embed(feats), select=False)


def stage1_loss(model, ev: dict, y: torch.Tensor, is_shot: torch.Tensor, patch_y: torch.Tensor) -> tuple:
    """Stage 1's loss on one step's evidence.

    Args:
        ev: :func:`adcore.models.sdmad.model.evidence` of the step's images.
        y: Class per image: 0 normal, 1..C a shot's category, -1 a synthetic anomaly (no category).
        is_shot: Which images are labelled shots.
        patch_y: [B, N] anomalous-patch targets (-1: unknown, a shot without a mask; left out).
    """
    cfg, logits = model.cfg, ev["category_logits"]  # [B, 1 + C]
    known = y >= 0
    counts = torch.bincount(y[known], minlength=logits.shape[1]).float()
    class_w = torch.where(counts > 0, 1.0 / counts.clamp_min(1), counts)  # every class weighs the same
    ce = (F.cross_entropy(logits[known], y[known], reduction="none") * class_w[y[known]]).sum() / class_w[
        y[known]
    ].sum()
    anomalous = (y != 0).float()
    any_loss = F.binary_cross_entropy_with_logits(ev["image_logit"], anomalous)
    parts = {"ce": ce, "any": any_loss}
    if is_shot.any():
        z = logits[is_shot, 1:]  # [k, C]
        own = z.gather(1, (y[is_shot] - 1)[:, None])[:, 0]
        other = z.masked_fill(F.one_hot(y[is_shot] - 1, z.shape[1]).bool(), float("-inf")).amax(1)
        parts["disc"] = F.relu(cfg.margin - (own - other)).mean() if z.shape[1] > 1 else z.new_zeros(())
        target = torch.cat([model.association[:, y[is_shot] - 1].T, torch.zeros_like(ev["act"][y == 0])])
        acts = torch.cat([ev["act"][is_shot], ev["act"][y == 0]])
        parts["sign"] = F.binary_cross_entropy_with_logits(acts, target)
    known = patch_y >= 0
    target = patch_y.clamp_min(0)
    pos = target.sum().clamp_min(1)
    pos_weight = ((known.sum() - pos) / pos).clamp(max=50.0)
    per_patch = F.binary_cross_entropy_with_logits(ev["map_logit"], target, pos_weight=pos_weight, reduction="none")
    parts["map"] = (per_patch * known).sum() / known.sum().clamp_min(1)
    total = ce + 0.5 * any_loss + cfg.w_map * parts["map"]
    total = total + cfg.w_disc * parts.get("disc", 0.0) + cfg.w_sign * parts.get("sign", 0.0)
    return total, {k: float(v.detach()) for k, v in parts.items()}


@torch.no_grad()
def fit_alignment(model, act: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Stage 2, per sign: aligned when its mean activation on the shots of the categories that list it
    beats both the normals' and every other category's (each category keeps at least its best sign)."""
    assoc = model.association  # [S, C]
    means = torch.stack([act[y == c].mean(0) for c in range(assoc.shape[1] + 1)], 1)  # [S, 1 + C]
    own = (means[:, 1:] * assoc).sum(1) / assoc.sum(1).clamp_min(1)
    rivals = torch.cat([means[:, :1], means[:, 1:].masked_fill(assoc > 0, float("-inf"))], 1).amax(1)
    margin = own - rivals
    aligned = (margin > 0).float()
    for c in range(assoc.shape[1]):
        listed = assoc[:, c] > 0
        if not (aligned * listed).any():
            best = torch.where(listed, margin, torch.full_like(margin, float("-inf"))).argmax()
            aligned[best] = 1.0
    return aligned


def _class_of(sample: bmad.Sample, names: list[str]) -> int:
    """0 normal, 1..C the category, -1 an anomaly without a known category."""
    if sample.label == 0:
        return 0
    return names.index(sample.category) + 1 if sample.category in names else -1


def _macro_f1(true: np.ndarray, pred: np.ndarray) -> float:
    f1 = []
    for c in np.unique(true):
        tp, fp, fn = (
            np.sum((pred == c) & (true == c)),
            np.sum((pred == c) & (true != c)),
            np.sum((pred != c) & (true == c)),
        )
        f1.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(f1))


@torch.no_grad()
def fit_selection(model, valid_feats: torch.Tensor, valid_y: np.ndarray) -> tuple[float, dict]:
    """Stage 2's threshold ``z``: best category macro-F1 on the validation split's categorised anomalies
    (first best in ``select_z_grid`` order); the configured ``select_z`` without such images."""
    cfg = model.cfg
    anomalous = valid_y > 0
    if anomalous.sum() == 0 or len(np.unique(valid_y[anomalous])) < 2:
        model.select_z.fill_(cfg.select_z)
        return cfg.select_z, {}
    patches = model.embed(valid_feats[torch.from_numpy(anomalous)])
    scores = {}
    for z in cfg.select_z_grid:
        model.select_z.fill_(float(z))
        pred = model.evidence(patches)["category_logits"][:, 1:].argmax(1).cpu().numpy() + 1
        scores[float(z)] = _macro_f1(valid_y[anomalous], pred)
    best = max(scores, key=scores.get)  # dicts keep grid order: ties go to the first
    model.select_z.fill_(best)
    return best, scores


def train_sdmad(model, ctx: TrainContext) -> dict:
    """Both stages; returns what the artifact's training summary adds."""
    cfg, run, hooks, device = model.cfg, ctx.cfg, ctx.hooks, ctx.device
    root, shots = labelled_shots(ctx)
    names = bmad.list_categories(root)
    if len(names) < 2:
        raise ValueError(f"SD-MAD tells anomaly categories apart: {root} needs a {bmad.CATEGORIES_FILE} with >= 2")
    missing = [s.path.name for s in shots if s.category not in names]
    if not shots or missing:
        raise ValueError(f"SD-MAD needs labelled anomalies with categories (--labelled k*C); uncategorised: {missing}")
    model.set_categories(names)
    model.to(device)
    pixels, labels = ctx.batches.pixels, np.asarray(ctx.batches.labels)
    size, g = model.input_size, model.grid
    shot_idx = _check_shots(pixels, labels, shots, size)
    rng = np.random.default_rng([run.seed, hooks.rank])
    normal_idx = np.flatnonzero(labels == 0)
    normal_idx = np.sort(rng.choice(normal_idx, min(len(normal_idx), cfg.max_normals), replace=False))
    t0 = time.monotonic()
    normal_px = torch.from_numpy(np.stack([pixels[i] for i in normal_idx]))
    syn_px, syn_masks = _synthetic([pixels[i] for i in normal_idx], [run.seed, hooks.rank])
    shot_px = torch.from_numpy(np.stack([pixels[i] for i in shot_idx]))
    # A shot without a mask supervises its image and category only: its patches' targets are unknown.
    shot_known = torch.tensor([ctx.batches.masks[i] is not None for i in shot_idx], dtype=torch.bool)
    shot_masks = torch.from_numpy(
        np.stack([np.zeros((size, size)) if m is None else m for m in (ctx.batches.masks[i] for i in shot_idx)])
    ).float()
    views = _augment(shot_px, cfg.shot_augment)
    mask_views = _augment(shot_masks[:, None], cfg.shot_augment)
    bs = run.batch_size
    f_normal = _features(model, normal_px, bs, device)  # [n, N, F]
    kept = model.fit_reduction(f_normal.flatten(0, 1), seed=run.seed)  # PCA of the normal patches
    f_normal = model.reduce(f_normal)  # [n, N, r]
    f_syn = model.reduce(_features(model, syn_px, bs, device))
    f_shot = torch.cat([model.reduce(_features(model, v, bs, device)) for v in views])
    y_shot = torch.tensor([names.index(s.category) + 1 for s in shots] * len(views), device=device)
    m_shot = torch.cat([_share(m[:, 0], g, shot_known) for m in mask_views]).to(device)
    m_syn = _share(syn_masks, g).to(device)
    log.info("SD-MAD features cached in %.0f s: %d normal, %d synthetic, %d shot views (%d shots, categories %s); "
             "PCA keeps %.2f of the variance", time.monotonic() - t0, len(f_normal), len(f_syn), len(f_shot),
             len(shots), names, kept)  # fmt: skip

    net = hooks.wrap(_Stage1(model))
    params = model.trainable_parameters()
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = SMOKE_STEPS if run.smoke_test else cfg.steps
    budget, started, done, parts = run.budget_s(2, ctx.elapsed()), time.monotonic(), 0, {}
    gen = torch.Generator().manual_seed(run.seed * 1009 + hooks.rank)
    nb = min(cfg.batch_normals, len(f_normal))
    if ctx.finished(STAGE):
        steps = 0
    for _ in range(steps):
        pick_n = torch.randperm(len(f_normal), generator=gen)[:nb].to(device)
        pick_s = torch.randperm(len(f_syn), generator=gen)[:nb].to(device)
        feats = torch.cat([f_normal[pick_n], f_syn[pick_s], f_shot])
        y = torch.cat([torch.zeros(nb, dtype=torch.long, device=device), torch.full((nb,), -1, device=device), y_shot])
        is_shot = torch.cat(
            [
                torch.zeros(2 * nb, dtype=torch.bool, device=device),
                torch.ones(len(f_shot), dtype=torch.bool, device=device),
            ]
        )
        patch_y = torch.cat([torch.zeros(nb, g * g, device=device), m_syn[pick_s], m_shot])
        loss, parts = stage1_loss(model, net(feats), y, is_shot, patch_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
        if budget is not None and dist.agree_stop(time.monotonic() - started > budget, hooks.world_size):
            break
    if STAGE not in ctx.stages_done:
        ctx.stages_done.append(STAGE)

    # Stage 2: aligned signs (shots vs normals), normal statistics and z (validation split).
    model.eval()
    with torch.no_grad():
        act_train = model.evidence(model.embed(torch.cat([f_normal, f_shot])), select=False)["act"]
        y_train = torch.cat([torch.zeros(len(f_normal), dtype=torch.long, device=device), y_shot])
        model.aligned.copy_(fit_alignment(model, act_train, y_train))
        valid_px = torch.from_numpy(np.stack([prepare(im, size) for im in ctx.valid["images"]]))
        f_valid = model.reduce(_features(model, valid_px, bs, device))
        valid_y = np.array([_class_of(s, names) for s in ctx.valid["samples"]])
        normal_valid = torch.from_numpy(valid_y == 0)
        act_valid = model.evidence(model.embed(f_valid[normal_valid]), select=False)["act"]
        model.act_mean.copy_(act_valid.mean(0))
        model.act_std.copy_(act_valid.std(0).nan_to_num(1.0).clamp_min(1e-3))
        z, z_scores = fit_selection(model, f_valid, valid_y)
    row = {"stage": STAGE, "steps": done, "loss": round(float(loss.detach()), 4) if done else None, **parts}
    row |= {"select_z": z, "aligned_signs": int(model.aligned.sum()), "elapsed_s": round(ctx.elapsed(), 1)}
    ctx.history.append(row)
    if hooks.is_main:
        log.info("SD-MAD: %s", format_row(row))

    def checkpoint() -> dict:
        return {
            "format": STATE_FORMAT,
            "stage": STAGE,
            "epoch": 1,
            "stages_done": list(ctx.stages_done),
            "elapsed_s": ctx.elapsed(),
            "history": list(ctx.history),
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        }

    hooks.report({**row, "epochs": 1}, checkpoint)
    return {
        "sdmad_steps": done,
        "categories": names,
        "shots_per_category": {n: sum(s.category == n for s in shots) for n in names},
        "select_z": z,
        "select_z_scores": z_scores,
        "aligned_signs": [s for s, a in zip(model.bank.signs, model.aligned.tolist()) if a],
    }

"""DRA: a shared feature network and four heads (papers.md section 4; official code ``Choubo/DRA``).

Heads, on the backbone's feature map ``F`` [B, C, g, g]:

* normal (holistic): GAP -> FC -> ReLU -> dropout -> FC 1 -> abs; trained to be *high* on normal images;
* seen: 1x1 conv, |.| per patch, mean of the top-K patches (K = ``topk_ratio`` of them);
* pseudo: the same form, trained on pseudo anomalies made from normal images;
* residual (latent residual / composite): ``mean(F(references)) - F`` -> 3x3 conv + BN + ReLU -> top-K head,
  where the references are ``n_ref`` normal training images fixed at training and saved with the weights.

Each head's score is averaged over ``n_scales`` image scales. The image logit is the sum of the raw
anomaly heads minus the raw normal head, as the official evaluation composes them. ``score`` is that
logit itself: a sigmoid in float32 rounds every strongly anomalous image to 1.0 and ties them; the
calibration maps the logit to [0, 1]. Artifacts saved before these choices (``normalise_heads``,
``sigmoid_outputs``) min-max normalise each head with statistics of the *validation* split (buffers
``head_lo``/``head_hi``) and output sigmoids; they load and score as they were trained.

Extension (not in the paper): the anomaly map is the sum of the seen and pseudo heads' per-patch scores
(normalised like their image scores under ``normalise_heads``), so the pipeline's mask column stays meaningful.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from adcore.models.base import AnomalyModel, ModelOutput
from adcore.models.dra.config import HEADS, DRAConfig

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_MIN_RANGE = 1e-6  # below this validation range a head counts as constant (no scaling)


class MobileNetFeatures(nn.Module):
    """ImageNet MobileNetV2 (stands in for ResNet-18): maps of ``stages`` concatenated at the first one's grid."""

    def __init__(self, pretrained: bool, stages: list[int]):
        super().__init__()
        from adcore.backbones import mobilenet_v2 as mnv2

        self.net = mnv2.mobilenet_v2_imagenet() if pretrained else mnv2.MobileNetV2()
        self.net.features = self.net.features[: max(stages) + 1]  # later blocks and the classifier are unused
        self.net.classifier = nn.Identity()
        self.stages = list(stages)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from adcore.backbones.mobilenet_v2 import features_at

        maps = features_at(self.net, (images - self.mean) / self.std, self.stages)
        size = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear") for m in maps]
        return torch.cat(maps, dim=1)  # [B, C, g, g]


class HolisticHead(nn.Module):
    """The normal head: a fully connected scorer on the average-pooled feature."""

    def __init__(self, channels: int, width: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(channels, width), nn.Linear(width, 1), nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.mean(dim=(2, 3))  # [B, C]
        return self.fc2(self.drop(F.relu(self.fc1(x)))).abs()[:, 0]  # [B]


class TopKHead(nn.Module):
    """1x1 conv patch scorer; image score = mean of the K largest absolute patch scores."""

    def __init__(self, channels: int, topk_ratio: float):
        super().__init__()
        self.scoring = nn.Conv2d(channels, 1, kernel_size=1)
        self.topk_ratio = topk_ratio

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.scoring(feats)[:, 0].abs()  # [B, g, g]
        flat = patches.flatten(1)  # [B, g*g]
        k = max(int(flat.shape[1] * self.topk_ratio), 1)
        return flat.topk(k, dim=1).values.mean(1), patches  # [B], [B, g, g]


class ResidualHead(TopKHead):
    """Latent-residual head: top-K scoring of conv(mean reference feature - feature)."""

    def __init__(self, channels: int, topk_ratio: float):
        super().__init__(channels, topk_ratio)
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())

    def forward(self, feats: torch.Tensor, ref_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = ref_feats.mean(0, keepdim=True) - feats  # [B, C, g, g]
        return super().forward(self.conv(residual))


class DRAModel(AnomalyModel):
    def __init__(self, cfg: DRAConfig):
        super().__init__()
        if cfg.backbone.kind != "mobilenet_v2":
            raise ValueError(
                f"DRA's backbone kind must be 'mobilenet_v2' (offline ImageNet CNN), got {cfg.backbone.kind!r}"
            )
        self.cfg = cfg
        self.input_size = int(cfg.backbone.image_size or 224)
        self.backbone = MobileNetFeatures(bool(cfg.backbone.weights), cfg.layers)
        with torch.no_grad():
            probe = self.backbone.eval()(torch.zeros(1, 3, self.input_size, self.input_size))
        self.backbone.train()
        channels, self.grid = probe.shape[1], probe.shape[-1]
        self.embedding_dim = channels
        self.normal_head = HolisticHead(channels, cfg.holistic_width, cfg.dropout)
        self.seen_head = TopKHead(channels, cfg.topk_ratio)
        self.pseudo_head = TopKHead(channels, cfg.topk_ratio)
        self.residual_head = ResidualHead(channels, cfg.topk_ratio)
        s = self.input_size
        self.register_buffer("ref_images", torch.zeros(cfg.n_ref, 3, s, s))  # the N_r reference normals
        self.register_buffer("ref_fixed", torch.zeros((), dtype=torch.uint8))  # 1 once references are chosen
        self.register_buffer("head_lo", torch.zeros(len(HEADS)))  # validation min of each head's score
        self.register_buffer("head_hi", torch.ones(len(HEADS)))  # validation max

    # --- artifact ----------------------------------------------------------
    def config_dict(self) -> dict:
        cfg = replace(self.cfg, backbone=replace(self.cfg.backbone, weights=None))  # weights travel in the artifact
        return {"family": "dra", **cfg.to_dict()}

    @classmethod
    def from_config_dict(cls, data: dict) -> DRAModel:
        data = {k: v for k, v in data.items() if k != "family"}
        # Saved before the fields existed: min-max normalised heads and sigmoid outputs.
        data.setdefault("normalise_heads", True)
        data.setdefault("sigmoid_outputs", True)
        return cls(DRAConfig.from_dict(data))

    # --- references and normalisation --------------------------------------
    def has_references(self) -> bool:
        return bool(self.ref_fixed.item())

    @torch.no_grad()
    def set_references(self, images: torch.Tensor) -> None:
        """Fix the N_r reference normals ([n_ref, 3, S, S] in [0, 1]); they are saved with the weights."""
        if tuple(images.shape) != tuple(self.ref_images.shape):
            raise ValueError(f"references must be {tuple(self.ref_images.shape)}, got {tuple(images.shape)}")
        self.ref_images.copy_(images)
        self.ref_fixed.fill_(1)

    @torch.no_grad()
    def set_normalisation(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Per-head min and max of the validation split's head scores (``HEADS`` order)."""
        self.head_lo.copy_(lo)
        self.head_hi.copy_(torch.where(hi - lo > _MIN_RANGE, hi, lo + 1))  # a constant head: shifted, not scaled

    # --- forward -----------------------------------------------------------
    def head_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw head scores [B, 4] (``HEADS`` order), seen/pseudo patch maps [B, 2, g, g], features [B, C, g, g]."""
        n_ref = self.ref_images.shape[0]
        scores, maps, first = [], [], None
        for s in range(self.cfg.n_scales):
            size = self.input_size // 2**s
            both = torch.cat([self.ref_images.to(images.dtype), images])  # references go through the same BN pass
            if s:
                both = F.interpolate(both, size=(size, size), mode="bilinear", align_corners=False)
            feats = self.backbone(both)  # [n_ref + B, C, h, w]
            ref, feats = feats[:n_ref], feats[n_ref:]
            first = feats if first is None else first
            seen, seen_map = self.seen_head(feats)
            pseudo, pseudo_map = self.pseudo_head(feats)
            residual, _ = self.residual_head(feats, ref)
            scores.append(torch.stack([self.normal_head(feats), seen, pseudo, residual], 1))  # [B, 4]
            pm = torch.stack([seen_map, pseudo_map], 1)  # [B, 2, h, w]
            if pm.shape[-1] != self.grid:
                pm = F.interpolate(pm, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
            maps.append(pm)
        return torch.stack(scores).mean(0), torch.stack(maps).mean(0), first

    def combine(self, scores: torch.Tensor, patch_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head scores [B, 4] -> image logit [B] (anomaly heads minus normal head) and map logit [B, g, g]."""
        if not self.cfg.normalise_heads:
            return scores[:, 1:].sum(1) - scores[:, 0], patch_maps.sum(1)
        z = (scores - self.head_lo) / (self.head_hi - self.head_lo)  # [B, 4]
        logit = z[:, 1:].sum(1) - z[:, 0]
        lo, hi = self.head_lo[1:3].view(1, 2, 1, 1), self.head_hi[1:3].view(1, 2, 1, 1)
        return logit, ((patch_maps - lo) / (hi - lo)).sum(1)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        scores, patch_maps, feats = self.head_outputs(images)
        logit, map_logit = self.combine(scores, patch_maps)
        out = torch.sigmoid if self.cfg.sigmoid_outputs else torch.clone  # raw logits: no ties at 1.0
        return ModelOutput(
            score=out(logit),
            anomaly_map=out(map_logit),
            patch_embeddings=feats.flatten(2).transpose(1, 2),  # [B, g*g, C]
            image_logit=logit,
            map_logit=map_logit,
        )

"""PatchCore: locally aware patch features matched against a memory bank.

The network here only produces patch features; the memory bank (built by
greedy coreset selection, :func:`adcore.layers.coreset.greedy_coreset`) lives
in the FAISS stage of the pipeline like the fusion model's centroids. The base
``score``/``anomaly_map`` are zeros: PatchCore's whole score is the
nearest-neighbour distance computed there.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from adcore.models.base import AnomalyModel, ModelOutput
from adcore.models.patchcore.config import PatchCoreConfig
from adcore.models.towers import Tower, TowerSpec

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class _CNNBackbone(torch.nn.Module):
    """MobileNetV2 (ImageNet) seen as a list of feature maps at given stages."""

    def __init__(self, spec: TowerSpec, stages: list[int]):
        super().__init__()
        from adcore.backbones import mobilenet_v2 as mnv2

        self.net = mnv2.mobilenet_v2_imagenet() if spec.weights else mnv2.MobileNetV2()
        self.stages = stages
        self.image_size = int(spec.image_size or 224)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            feats = self.feature_maps(torch.zeros(1, 3, self.image_size, self.image_size))
        self.grid = feats[0].shape[-1]
        self.width = sum(f.shape[1] for f in feats)

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        from adcore.backbones.mobilenet_v2 import features_at

        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return features_at(self.net, (x - self.mean) / self.std, self.stages)


class PatchCoreModel(AnomalyModel):
    def __init__(self, cfg: PatchCoreConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.backbone.kind == "mobilenet_v2":
            self.cnn = _CNNBackbone(cfg.backbone, cfg.layers)
            self.tower = None
            self.input_size, self.grid, width = self.cnn.image_size, self.cnn.grid, self.cnn.width
        else:
            self.cnn = None
            self.tower = Tower(cfg.backbone)
            self.tower.drop_clip()
            bad = [i for i in cfg.layers if not 0 < i <= self.tower.depth]
            if bad:
                raise ValueError(f"layers {bad} outside the backbone's 1..{self.tower.depth}")
            self.input_size, self.grid, width = (
                self.tower.image_size,
                self.tower.grid,
                self.tower.width * len(cfg.layers),
            )
        self.embedding_dim = width
        self.requires_grad_(False)

    def config_dict(self) -> dict:
        cfg = self.cfg
        if self.tower is not None:
            cfg = replace(cfg, backbone=self.tower.frozen_spec())
        else:
            cfg = replace(cfg, backbone=replace(cfg.backbone, weights=None))
        return {"family": "patchcore", **cfg.to_dict()}

    @classmethod
    def from_config_dict(cls, data: dict) -> PatchCoreModel:
        data = {k: v for k, v in data.items() if k != "family"}
        data.setdefault("pool_zero_padding", False)  # saved before the field existed: they averaged inside only
        return cls(PatchCoreConfig.from_dict(data))

    def _feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.cnn is not None:
            return self.cnn.feature_maps(images)
        states, _ = self.tower.hidden_states(images)
        g, maps = self.tower.grid, []
        for i in self.cfg.layers:
            patches = states[i][:, 1:]  # [B, g*g, W], CLS dropped
            maps.append(patches.transpose(1, 2).reshape(patches.shape[0], -1, g, g))  # [B, W, g, g]
        return maps

    def forward(self, images: torch.Tensor) -> ModelOutput:
        k, zero_pad = self.cfg.aggregation_kernel, self.cfg.pool_zero_padding
        maps = []
        for fmap in self._feature_maps(images):
            fmap = F.avg_pool2d(fmap, k, stride=1, padding=k // 2, count_include_pad=zero_pad)
            if fmap.shape[-1] != self.grid:
                fmap = F.interpolate(fmap, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
            maps.append(fmap)
        feats = torch.cat(maps, dim=1)  # [B, E, g, g]
        b = feats.shape[0]
        embeddings = feats.flatten(2).transpose(1, 2)  # [B, g*g, E]
        zeros_map = feats.new_zeros(b, self.grid, self.grid)
        zeros = feats.new_zeros(b)
        return ModelOutput(
            score=zeros, anomaly_map=zeros_map, patch_embeddings=embeddings, image_logit=zeros, map_logit=zeros_map
        )

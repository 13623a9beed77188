"""CLIP + BEiT fusion with adapters and text anchors (papers.md section 1).

Forward, in the paper's terms (C: vision/CLIP tower, B: domain/BEiT tower):

1. B runs on its own (frozen in stage 2) and exposes its hidden states B_i.
2. C runs layer by layer. After every depth/6 layers (CLIP-L: 4, 8, ..., 24)
   input_i = beta * C_i + gamma * B_i goes through adapter i, giving F_i and the
   text logits MLP_text_i; C continues from alpha * F_i + (1 - alpha) * C_i.
   B_i is projected to C's width and resampled to C's patch grid when they differ.
3. The last adapter output, C's final state and B's final state each go through
   the visual projection, are L2-normalised and matched with the anchors [D, 2].
   outputs_final = their sum + the *mean* of the per-layer seg MLP_text_i (the
   paper writes "+ MLP_text_i"; the mean keeps the scale independent of depth).
4. Map: softmax over (normal, anomalous) per patch; score: mean of the
   anomalous column over patches (or the top-k mean, see ``score_reduction``).
   The image logit adds the cls heads' text logits on the CLS token.

Extensions (config fields, off unless a preset turns them on; docs/models/fusion.md):
``adapter_residual`` (C continues from C_i + F_i, adapter outputs zero-initialised, so the
untrained model is the frozen tower), ``adapter_side`` (adapters as side branches that never write
back into the vision tower: stage 2 needs no gradient through a tower, and one tower serves as both
when vision and domain are the same frozen one), ``train_scored`` (the image logit is the logit of the
exported score) and ``memory_layers`` (frozen domain-tower features of those layers, 3x3
averaged, appended to ``patch_embeddings`` for the head's nearest-normal-patch memory).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adcore.layers.adapter import FusionAdapter
from adcore.models.base import AnomalyModel, ModelOutput
from adcore.models.fusion.config import FusionConfig, TextSpec
from adcore.models.towers import Tower, match_tokens


def fusion_points(depth: int, n_fusion: int) -> list[int]:
    """1-based layer indices after which adapters sit: every depth/n layers."""
    if depth < n_fusion:
        raise ValueError(f"tower depth {depth} is smaller than n_fusion={n_fusion}")
    return [round(depth * k / n_fusion) for k in range(1, n_fusion + 1)]


def encode_anchors(text: TextSpec, dim: int, clip_weights: str | None) -> torch.Tensor:
    """Text anchors [dim, 2] (normal, anomalous) from the prompt bank."""
    if text.kind == "random":
        gen = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen))
        return q
    from adcore.backbones import text as text_towers
    from adcore.prompts import load_prompt_bank

    bank = load_prompt_bank(text.domain)
    if text.kind == "clip":
        if not clip_weights:
            raise ValueError(
                "text kind 'clip' needs the vision tower's CLIPModel weights folder (the text tower lives there)"
            )
        tower = text_towers.ClipTextTower(clip_weights)
    else:
        tower = text_towers.load_text_tower(text.kind, text.weights or str(text_towers.minilm_dir()))
    anchors = text_towers.text_anchors(tower, bank.normal, bank.anomalous)  # [D, 2]
    if text.center:
        # Both banks describe the same anatomy, so a stand-in encoder's two anchors are
        # nearly parallel (cosine ~0.94 for MiniLM); only their difference separates the
        # classes. Centring keeps that difference and drops the shared part.
        anchors = anchors - anchors.mean(axis=1, keepdims=True)
        anchors = anchors / np.linalg.norm(anchors, axis=0, keepdims=True)
    if anchors.shape[0] != dim:
        raise ValueError(f"text anchors are {anchors.shape[0]}-d but the projection is {dim}-d")
    return torch.from_numpy(np.ascontiguousarray(anchors, dtype=np.float32))


class FusionModel(AnomalyModel):
    def __init__(self, cfg: FusionConfig, anchors: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.adapter_side and cfg.train_last_layers:
            raise ValueError("adapter_side keeps the vision tower frozen: set train_last_layers to 0")
        self.vision = Tower(cfg.vision)
        # Side adapters on one tower twice (fusion-small's DINOv2 as vision and domain), never trained: one module.
        self.shared_tower = cfg.adapter_side and cfg.domain_train_layers == 0 and cfg.vision == cfg.domain
        self.domain = self.vision if self.shared_tower else Tower(cfg.domain)
        if not self.vision.layerwise:
            raise ValueError(f"adapters cannot sit inside a {cfg.vision.kind!r} tower; use it as the domain tower")
        v, d = self.vision, self.domain
        self.points = fusion_points(v.depth, cfg.n_fusion)
        self.domain_points = fusion_points(d.depth, cfg.n_fusion)
        clip = v.clip_model
        clip_projection = clip.visual_projection if clip is not None else None  # CLIP's own, 1024->768 at paper size
        proj_dim = int(clip_projection.out_features) if clip_projection is not None else int(cfg.proj_dim or v.width)
        text_dim = proj_dim
        if anchors is None:
            anchors = encode_anchors(cfg.text, text_dim, cfg.vision.weights)
        v.drop_clip()
        self.register_buffer("anchors", anchors.float())  # [D, 2]
        # Domain hidden states are mapped to the vision width when the towers differ.
        self.domain_to_vision = nn.Identity() if d.width == v.width else nn.Linear(d.width, v.width)
        self.domain_final = nn.Identity() if d.width == v.width else nn.Linear(d.width, v.width)
        self.adapters = nn.ModuleList(FusionAdapter(v.width, text_dim) for _ in self.points)
        if cfg.adapter_residual:  # extension: every adapter starts as a zero residual (identity)
            for adapter in self.adapters:
                for out_layer in (adapter.cls_out, adapter.seg_out):
                    nn.init.zeros_(out_layer.weight)
                    nn.init.zeros_(out_layer.bias)
        bad = [i for i in cfg.memory_layers if not 0 < i <= d.depth]
        if bad:
            raise ValueError(f"memory_layers {bad} outside the domain tower's 1..{d.depth}")
        self.projection = clip_projection if clip_projection is not None else nn.Linear(v.width, proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale)))
        self.domain_head = nn.Linear(d.width, 1)  # stage 1: binary normal/anomalous classifier
        self.input_size = cfg.input_size or max(v.image_size, d.image_size)  # towers resize down from it
        self.grid = v.grid
        self.proj_dim = proj_dim
        self.memory_dim = d.width * len(cfg.memory_layers)  # memory features after the projected embeddings
        self.embedding_dim = proj_dim + self.memory_dim
        self.freeze_for_stage(2)

    def config_dict(self) -> dict:
        """The config that rebuilds this exact architecture without pretrained weights."""
        from dataclasses import replace

        frozen = replace(
            self.cfg, vision=self.vision.frozen_spec(), domain=self.domain.frozen_spec(), proj_dim=self.proj_dim
        )
        return {"family": "fusion", **frozen.to_dict()}

    @classmethod
    def from_config_dict(cls, data: dict) -> FusionModel:
        data = {k: v for k, v in data.items() if k != "family"}
        # Saved before the field existed: the network took the vision tower's size (others resized from it).
        data.setdefault("input_size", data["vision"].get("image_size"))
        cfg = FusionConfig.from_dict(data)
        dim = int(cfg.proj_dim)
        return cls(cfg, anchors=torch.zeros(dim, 2))  # anchors come with the artifact's weights

    def freeze_for_stage(self, stage: int) -> None:
        """Stage 1: last domain layers + domain head. Stage 2: adapters, projection, last vision layer(s)."""
        for p in self.parameters():
            p.requires_grad_(False)
        if stage == 1:
            for layer in list(self.domain.layers)[len(self.domain.layers) - self.cfg.domain_train_layers :]:
                layer.requires_grad_(True)
            self.domain_head.requires_grad_(True)
            return
        for module in (self.adapters, self.projection, self.domain_to_vision, self.domain_final):
            module.requires_grad_(True)
        if self.cfg.adapter_side:  # only the last adapter's output is used; with train_scored no cls logit either
            for adapter in self.adapters[:-1]:
                for unused in (adapter.cls_out, adapter.seg_out, *([adapter.cls_in] if self.cfg.train_scored else [])):
                    unused.requires_grad_(False)
        self.logit_scale.requires_grad_(True)
        for layer in list(self.vision.layers)[-self.cfg.train_last_layers :] if self.cfg.train_last_layers else []:
            layer.requires_grad_(True)

    def domain_logit(self, images: torch.Tensor) -> torch.Tensor:
        """Stage-1 classifier logit [B] from the mean-pooled final domain patch tokens."""
        _, final = self.domain.hidden_states(images)
        return self.domain_head(final[:, 1:].mean(1)).squeeze(-1)

    def _text_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(self.projection(tokens), dim=-1)  # [B, T, D]
        return emb @ self.anchors

    def forward(self, images: torch.Tensor) -> ModelOutput:
        v, cfg = self.vision, self.cfg
        domain_frozen = not any(p.requires_grad for p in self.domain.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not domain_frozen):
            b_states, b_final = self.domain.hidden_states(images)
        v_states = b_states if self.shared_tower else None  # the vision tower's states, when it is the domain's
        h = v.embed(v.prepare(images)) if v_states is None else v_states[0]  # [B, 1+g*g, W]
        seg_texts, cls_texts = [], []
        fused = h
        point_of_layer = dict(zip(self.points, self.domain_points))
        for i in range(v.depth):  # side adapters: a frozen tower on an input without gradient builds no graph
            h = v.run_layer(i, h) if v_states is None else v_states[i + 1]
            if i + 1 in point_of_layer:
                k = len(seg_texts)
                b_i = match_tokens(self.domain_to_vision(b_states[point_of_layer[i + 1]]), v.grid)
                out, cls_text, seg_text = self.adapters[k](cfg.beta * h + cfg.gamma * b_i, self.anchors)
                if cfg.adapter_residual:
                    fused = stream = h + out  # extension: the adapter adds to the stream, starting at zero
                else:
                    fused, stream = out, cfg.alpha * out + (1 - cfg.alpha) * h
                if not cfg.adapter_side:  # paper: the vision tower continues from the adapter's output
                    h = stream
                seg_texts.append(seg_text)
                cls_texts.append(cls_text)
        c_final = b_final if v_states is not None else v.final_norm(h)
        b_final = match_tokens(self.domain_final(b_final), v.grid)
        scale = self.logit_scale.exp()
        logits = self._text_logits(fused) + self._text_logits(c_final) + self._text_logits(b_final)
        logits = scale * (logits + torch.stack(seg_texts).mean(0))  # [B, 1+g*g, 2]
        patch_logit = logits[:, 1:, 1] - logits[:, 1:, 0]  # [B, g*g] log-odds of "anomalous"
        probs = torch.sigmoid(patch_logit)  # = softmax over the two columns
        g = v.grid
        cls_logit = scale * torch.stack(cls_texts).mean(0)[:, 0]  # [B, 2], CLS token
        score = self._reduce(probs)
        if cfg.train_scored:  # extension: BCE on this logit is BCE on the exported score
            s = score.float().clamp(1e-6, 1 - 1e-6)
            image_logit = torch.log(s) - torch.log1p(-s)
        else:
            image_logit = (cls_logit[:, 1] - cls_logit[:, 0]) + self._reduce(patch_logit)
        embeddings = F.normalize(self.projection(fused[:, 1:]), dim=-1)  # [B, g*g, D]
        if cfg.memory_layers:
            embeddings = torch.cat([embeddings, self.memory_features(b_states).detach().to(embeddings.dtype)], dim=-1)
        return ModelOutput(
            score=score,
            anomaly_map=probs.reshape(-1, g, g),
            patch_embeddings=embeddings,
            image_logit=image_logit,
            map_logit=patch_logit.reshape(-1, g, g),
        )

    def memory_features(self, domain_states: list[torch.Tensor]) -> torch.Tensor:
        """Frozen domain-tower patch features of ``memory_layers`` [B, g*g, memory_dim] (extension).

        As PatchCore's: each layer's patch tokens averaged over a ``memory_kernel`` neighbourhood,
        resampled to the vision grid, concatenated.
        """
        k, g, maps = self.cfg.memory_kernel, self.vision.grid, []
        zero_pad = self.cfg.memory_zero_padding
        for i in self.cfg.memory_layers:
            patches = domain_states[i][:, 1:]
            side = int(round(patches.shape[1] ** 0.5))
            fmap = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
            fmap = F.avg_pool2d(fmap, k, stride=1, padding=k // 2, count_include_pad=zero_pad)
            if side != g:
                fmap = F.interpolate(fmap, size=(g, g), mode="bilinear", align_corners=False)
            maps.append(fmap)
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)

    def _reduce(self, per_patch: torch.Tensor) -> torch.Tensor:
        if self.cfg.score_reduction == "mean":
            return per_patch.mean(1)
        if self.cfg.score_reduction == "topk":
            k = max(1, int(per_patch.shape[1] * self.cfg.topk_fraction))
            return per_patch.topk(k, dim=1).values.mean(1)
        raise ValueError(f"unknown score_reduction {self.cfg.score_reduction!r}")

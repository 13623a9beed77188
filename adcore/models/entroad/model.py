"""EntroAD: zero-shot anomaly detection routed by structural entropy (papers.md section 5).

Forward (the abstract's parts, then adcore's choices where it is silent, marked "adcore:"):

1. Frozen vision tower, run once through the transformers model with ``output_attentions`` and
   ``output_hidden_states`` (eager attention): nothing of its forward is copied. The tower is never
   trained: it is the pretrained prior the method keeps.
2. Patch-relation graph: per layer of ``entropy_layers``, the head-averaged attention between patch
   tokens, rows renormalised (:func:`adcore.layers.structural_entropy.patch_graph`).
3. Patch-level structural entropy ``h_i`` in [0, 1]: the node term of the graph's one-level
   structural entropy, i.e. the normalised entropy of patch i's out-edges
   (:mod:`adcore.layers.structural_entropy` says why this estimator), averaged over the layers.
4. Entropy-guided routing: ``r_i = sigmoid(a * z_i + b)`` with ``z_i`` the within-image z-score of
   ``h_i`` (adcore: z-scored so the route does not depend on a domain's overall entropy level;
   ``a``, ``b`` learned, ``a`` starts positive). ``1 - r_i`` goes to the *salient, localised* path,
   ``r_i`` to the *subtle, diffuse* path:
   - salient path (adcore): MLP of the token's residual against its 3x3 grid neighbourhood plus its
     within-image rarity (1 - best cosine to any patch outside that neighbourhood): a compact
     lesion stands out from what surrounds it and has no look-alike elsewhere in the image;
   - diffuse path (adcore): MLP of the token's residual against its graph context (one random-walk
     step on the attention graph) plus the z-scored ``h_i``: a mild, spread-out change looks like its grid
     neighbours (they changed too) but not like the tissue it relates to across the image.
   Both paths see residuals, not raw features, meant to carry less of the training domain's
   appearance (adcore; the transfer is not shown on the demo sets yet, docs/models/entroad.md).
   Tokens: ``e_i = normalize((1 - r_i) S_i + r_i D_i)`` in the joint space.
5. Confidence-aware dual-branch prompt adaptation: a learned branch matches ``e_i`` with learned
   prompts ``normalize(P + delta)`` (``delta`` starts at zero), the prior branch with the frozen
   prompts ``P`` (pooled, domain-agnostic prompt banks); logits ``l = s * e.(t_anom - t_norm) + c``.
   adcore: the confidence is the learned branch's own margin ``k_i = |2 sigmoid(l_learn) - 1|`` and
   the blend ``l = k_i l_learn + (1 - k_i) l_prior``: where the learned branch is unsure (an unseen
   domain), the frozen prior decides.
   adcore: plus a structural-evidence term ``-w z_i`` (``w`` learned, starting at
   ``entropy_evidence``): on the brain demo's validation split a lesion's patches attend more
   narrowly than the tissue around them (lower ``h_i``), a cue that needs no target-domain training.
6. Map: ``sigmoid(l)`` per patch; score: mean of the top ``topk_fraction`` patches (adcore).
   ``patch_embeddings`` are the ``e_i``.

With CLIP weights, ``P`` would be CLIP's own text features and the prior branch CLIP's zero-shot
alignment; offline adcore has DINOv2 + a MiniLM stand-in, so the prior is the prompts only and the
projection learns to align with them (docs/models/entroad.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from adcore.layers.structural_entropy import graph_smooth, node_entropy, patch_graph
from adcore.models.base import AnomalyModel, ModelOutput
from adcore.models.entroad.config import EntroADConfig
from adcore.models.entroad.prompts import prior_anchors
from adcore.models.towers import Tower

_STD_FLOOR = 1e-2  # within-image entropy spread counted as flat below this (keeps float noise out of the route)


@dataclass
class EntroADBranches:
    """Everything one forward computes, for losses, tests and inspection (patch order, [B, N])."""

    entropy: torch.Tensor  # structural entropy per patch, in [0, 1]
    route: torch.Tensor  # share of each token sent to the diffuse path
    rarity: torch.Tensor  # 1 - best cosine to a patch outside the neighbourhood
    learned_logit: torch.Tensor
    prior_logit: torch.Tensor
    confidence: torch.Tensor
    evidence: torch.Tensor  # structural-entropy term added to the blended logit
    output: ModelOutput


class AdaptationPath(nn.Module):
    """MLP of layer-normed residual features plus one per-patch cue (kept outside the norm, so its
    scale survives): ``[B, N, F]``, ``[B, N]`` -> ``[B, N, out_dim]``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim + 1, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, residual: torch.Tensor, cue: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.norm(residual), cue[..., None]], dim=-1))


def _far_mask(grid: int, radius: int) -> torch.Tensor:
    """[N, N] True where patches lie farther apart than ``radius`` (Chebyshev, on the grid)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    r, c = rows.flatten(), cols.flatten()
    return torch.maximum((r[:, None] - r[None]).abs(), (c[:, None] - c[None]).abs()) > radius


def neighbourhood_mean(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, g*g, D] -> the 3x3 grid-neighbourhood mean of every token (borders: what exists)."""
    b, n, d = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(b, d, grid, grid)
    fmap = F.avg_pool2d(fmap, 3, stride=1, padding=1, count_include_pad=False)
    return fmap.reshape(b, d, n).transpose(1, 2)


class EntroADModel(AnomalyModel):
    def __init__(self, cfg: EntroADConfig, anchors: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.vision.attn_implementation != "eager":
            raise ValueError("EntroAD reads attention weights: the vision tower needs attn_implementation='eager'")
        self.vision = Tower(cfg.vision)
        self.vision.drop_clip()
        v = self.vision
        bad = [i for i in [*cfg.entropy_layers, *cfg.feature_layers] if not 0 < i <= v.depth]
        if bad:
            raise ValueError(f"layers {bad} outside the vision tower's 1..{v.depth}")
        if anchors is None:
            anchors = prior_anchors(cfg.text, cfg.proj_dim)
        dim = int(anchors.shape[0])
        self.register_buffer("prior_prompts", anchors.float())  # [D, 2] frozen prior (normal, anomalous)
        self.prompt_delta = nn.Parameter(torch.zeros_like(self.prior_prompts))  # learned prompt branch
        in_dim = v.width * len(cfg.feature_layers)
        self.salient = AdaptationPath(in_dim, cfg.hidden, dim)
        self.diffuse = AdaptationPath(in_dim, cfg.hidden, dim)
        self.route_gain = nn.Parameter(torch.tensor(float(cfg.route_gain)))
        self.route_bias = nn.Parameter(torch.tensor(0.0))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(0.0))
        self.entropy_weight = nn.Parameter(torch.tensor(float(cfg.entropy_evidence)))
        self.register_buffer("far", _far_mask(v.grid, cfg.rarity_radius), persistent=False)
        self.input_size, self.grid = v.image_size, v.grid
        self.proj_dim = self.embedding_dim = dim
        v.requires_grad_(False)

    def config_dict(self) -> dict:
        """The config that rebuilds this architecture without pretrained weights."""
        frozen = replace(self.cfg, vision=self.vision.frozen_spec(), proj_dim=self.proj_dim)
        return {"family": "entroad", **frozen.to_dict()}

    @classmethod
    def from_config_dict(cls, data: dict) -> EntroADModel:
        cfg = EntroADConfig.from_dict({k: v for k, v in data.items() if k != "family"})
        return cls(cfg, anchors=torch.zeros(int(cfg.proj_dim), 2))  # the prompts come with the weights

    def train(self, mode: bool = True) -> EntroADModel:
        super().train(mode)
        self.vision.eval()  # the frozen prior never runs in training mode
        return self

    @staticmethod
    def entropy_zscore(entropy: torch.Tensor) -> torch.Tensor:
        """[B, N] -> within-image z-score: the same on every domain whatever its entropy level."""
        mean = entropy.mean(1, keepdim=True)
        std = entropy.std(1, keepdim=True, unbiased=False)
        return (entropy - mean) / std.clamp_min(_STD_FLOOR)

    def route(self, entropy: torch.Tensor) -> torch.Tensor:
        """[B, N] entropy -> [B, N] share of each token routed to the diffuse path."""
        return torch.sigmoid(self.route_gain * self.entropy_zscore(entropy) + self.route_bias)

    def _prompt_logit(self, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        direction = prompts[:, 1] - prompts[:, 0]  # [D]: anomalous minus normal
        return self.logit_scale.exp() * (tokens @ direction) + self.logit_bias  # [B, N]

    def branches(self, images: torch.Tensor) -> EntroADBranches:
        v, cfg, g = self.vision, self.cfg, self.vision.grid
        n = g * g
        with torch.no_grad():  # the frozen tower: attention graph and features, no gradients
            out = v.model(pixel_values=v.prepare(images), output_attentions=True, output_hidden_states=True)
            feats = [v.final_norm(out.hidden_states[i])[:, -n:] for i in cfg.feature_layers]  # [B, N, W] each
            graphs = [patch_graph(out.attentions[i - 1], n) for i in cfg.entropy_layers]  # [B, N, N] each
        x = torch.cat(feats, dim=-1)  # [B, N, L*W]
        entropy = torch.stack([node_entropy(a) for a in graphs]).mean(0)  # [B, N]
        graph = torch.stack(graphs).mean(0)  # [B, N, N], still row-stochastic
        last = F.normalize(feats[-1], dim=-1)
        sims = (last @ last.transpose(1, 2)).masked_fill(~self.far, -1.0)  # [B, N, N]
        rarity = 1.0 - sims.max(-1).values  # [B, N]
        z = self.entropy_zscore(entropy)
        salient = self.salient(x - neighbourhood_mean(x, g), rarity)  # [B, N, D]
        diffuse = self.diffuse(x - graph_smooth(graph, x), z)  # [B, N, D]
        route = torch.sigmoid(self.route_gain * z + self.route_bias)
        tokens = F.normalize((1 - route)[..., None] * salient + route[..., None] * diffuse, dim=-1)  # [B, N, D]
        learned = F.normalize(self.prior_prompts + self.prompt_delta, dim=0)
        learned_logit = self._prompt_logit(tokens, learned)
        prior_logit = self._prompt_logit(tokens, self.prior_prompts)
        confidence = (2 * torch.sigmoid(learned_logit) - 1).abs()
        evidence = -self.entropy_weight * z  # [B, N] structural evidence: focused relations are suspicious
        logit = confidence * learned_logit + (1 - confidence) * prior_logit + evidence  # [B, N]
        probs = torch.sigmoid(logit)
        k = max(1, int(n * cfg.topk_fraction))
        score = probs.topk(k, dim=1).values.mean(1)  # [B]
        s = score.clamp(1e-6, 1 - 1e-6)
        output = ModelOutput(
            score=score,
            anomaly_map=probs.reshape(-1, g, g),
            patch_embeddings=tokens,
            image_logit=torch.log(s) - torch.log1p(-s),  # BCE on it is BCE on the exported score
            map_logit=logit.reshape(-1, g, g),
        )
        return EntroADBranches(entropy, route, rarity, learned_logit, prior_logit, confidence, evidence, output)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        return self.branches(images).output

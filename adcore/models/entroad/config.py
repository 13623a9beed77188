"""EntroAD configuration (papers.md section 5; arXiv 2605.28630). Choices the abstract leaves open are
marked "adcore:" and explained in the model's docstring and docs/models/entroad.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from adcore.models.towers import TowerSpec


@dataclass
class PromptSpec:
    """Where the frozen prior prompts (text anchors [D, 2]) come from.

    ``sentence``: the offline MiniLM encoder (stand-in for CLIP's text tower: not aligned with the
    image tower, so the projection learns the alignment); ``clip``: a CLIPModel folder's text tower;
    ``random``: seeded orthonormal anchors, tiny test models only.
    """

    kind: str = "sentence"
    weights: str | None = None  # text model folder; None with "sentence": the packaged MiniLM
    # adcore: prompt banks pooled into domain-agnostic "normal" / "anomalous" anchors, so the
    # artifact carries no prompts of its training domain; empty = every bundled bank.
    domains: list[str] = field(default_factory=list)
    center: bool = True  # subtract the anchors' mean (stand-in encoders' anchors are near-parallel)


@dataclass
class EntroADConfig:
    vision: TowerSpec  # frozen ViT whose self-attention defines the patch graph (eager attention)
    text: PromptSpec = field(default_factory=PromptSpec)
    entropy_layers: list[int] = field(default_factory=lambda: [10, 11, 12])  # adcore: last quarter of ViT-S/14
    feature_layers: list[int] = field(default_factory=lambda: [6, 9, 12])  # adcore: mid to last hidden states
    hidden: int = 256  # width of each adaptation path's MLP
    proj_dim: int | None = None  # joint image-text width; None: the text anchors' width
    rarity_radius: int = 1  # adcore: patches within this Chebyshev distance are not "other" patches
    route_gain: float = 2.0  # initial slope of the routing gate on the within-image entropy z-score
    logit_scale: float = 10.0  # initial cosine -> logit temperature, learned
    topk_fraction: float = 0.05  # image score: mean of the top 5 % patch probabilities (small lesions)
    # adcore: initial weight of the structural evidence -z(h_i) in the patch logit (learned); on the brain
    # demo's validation split, before training, low within-image entropy marks lesion patches (docs/models/entroad.md)
    entropy_evidence: float = 1.0
    prior_loss_weight: float = 0.5  # adcore: the frozen-prompt branch is trained to agree with the masks too

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EntroADConfig:
        data = dict(data)
        data["vision"] = TowerSpec(**data["vision"])
        data["text"] = PromptSpec(**data.get("text", {}))
        cfg = cls(**data)
        if not cfg.entropy_layers or not cfg.feature_layers:
            raise ValueError("entropy_layers and feature_layers must name at least one layer each")
        if not 0 < cfg.topk_fraction <= 1 or cfg.rarity_radius < 0:
            raise ValueError(f"need 0 < topk_fraction <= 1 and rarity_radius >= 0, got {cfg}")
        return cfg

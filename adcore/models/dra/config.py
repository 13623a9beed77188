"""DRA configuration (Ding, Pang, Shen, "Catching Both Gray and Black Swans", CVPR 2022; papers.md section 4).

Defaults are the paper's and its official code's values; where adcore differs the comment says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from adcore.models.towers import TowerSpec

# Head order in every [B, 4] score tensor and in the normalisation buffers.
HEADS = ("normal", "seen", "pseudo", "residual")


@dataclass
class DRAConfig:
    backbone: TowerSpec
    # MobileNetV2 blocks whose maps are concatenated at the first one's grid: 13 (stride 16, 96 ch) and
    # 17 (stride 32, 320 ch). At 224 px this is the paper's 14x14 grid of ResNet-18 layer4 at 448 px.
    layers: list[int] = field(default_factory=lambda: [13, 17])
    n_scales: int = 2  # official: the image and its half-size copy, head scores averaged
    topk_ratio: float = 0.1  # K = 10 % of patches (top-K MIL of the seen, pseudo and residual heads)
    holistic_width: int = 256  # normal head: GAP -> FC width -> ReLU -> dropout -> FC 1 -> abs
    dropout: float = 0.0  # official HolisticHead default
    n_ref: int = 5  # N_r reference normals, fixed at training and saved with the weights
    # Deviation loss: dev = (score - mean(ref)) / std(ref), ref = ref_draws draws of N(0, 1).
    ref_draws: int = 5000
    margin: float = 5.0
    # Training (official code): Adam, StepLR, clipping, epochs x steps of balanced batches.
    lr: float = 2e-4
    weight_decay: float = 1e-5
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    grad_clip: float = 1.0
    epochs: int = 30
    steps_per_epoch: int = 20
    batch_size: int = 48
    normal_share: float = 2 / 3  # of each batch from normal images (official BalancedBatchSampler)
    pseudo_p: float = 0.5  # a drawn normal becomes a pseudo anomaly (official: randint(0, 1))
    # How pseudo anomalies are made: "cutmix" (official CutMix: area 0.02-0.15, aspect 0.3, +-45 degrees,
    # colour jitter 0.1) and "synth" (adcore's Perlin texture, foreign-image texture, CutPaste).
    pseudo_kinds: list[str] = field(default_factory=lambda: ["cutmix", "synth"])
    rotation_deg: float = 180.0  # official: RandomRotation(180) on every training image
    # Image logit: the official sum of raw head scores (seen + pseudo + residual - normal). True: each
    # head min-max normalised with validation statistics first (artifacts saved before this field).
    normalise_heads: bool = False
    # score / anomaly_map are the raw logits, so rankings never tie. True: their sigmoids, which float32
    # rounds to 1.0 on strongly anomalous images (artifacts saved before this field).
    sigmoid_outputs: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DRAConfig:
        data = dict(data)
        data["backbone"] = TowerSpec(**data["backbone"])
        cfg = cls(**data)
        unknown = set(cfg.pseudo_kinds) - {"cutmix", "synth"}
        if unknown or not cfg.pseudo_kinds:
            raise ValueError(f"pseudo_kinds must be a non-empty subset of ['cutmix', 'synth'], got {cfg.pseudo_kinds}")
        if cfg.n_ref < 1 or cfg.n_scales < 1 or not 0 < cfg.topk_ratio <= 1:
            raise ValueError(f"need n_ref >= 1, n_scales >= 1, 0 < topk_ratio <= 1; got {cfg}")
        return cfg

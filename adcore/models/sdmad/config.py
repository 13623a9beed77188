"""SD-MAD configuration (sign-driven few-shot multi-anomaly detection, arXiv 2505.16659; papers.md section 2).

The paper's text is an abstract: every value below is adcore's choice, with the reason beside it
(``adcore/models/sdmad/model.py`` and docs/models/sdmad.md say what each part does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from adcore.models.towers import TowerSpec

TEXT_KINDS = ("clip", "sentence", "random")


@dataclass
class SignTextSpec:
    """Where the sign embeddings come from.

    ``clip``: the CLIP text tower of the vision tower's CLIPModel folder (the large preset, as the
    paper's CLIP backbone). ``sentence``: a local sentence encoder (all-MiniLM-L6-v2, offline) standing
    in on CPU; its space is not the image tower's, so the trained projection does the aligning.
    ``random``: seeded random unit vectors of width ``dim`` (tiny test models only).
    """

    kind: str = "clip"
    weights: str | None = None  # sentence encoder folder; None = the packaged MiniLM
    domain: str = "brain_mri"  # sign bank (adcore/signs/<domain>.json)
    categories: list[str] | None = None  # the categories told apart; None = every category of the bank
    dim: int = 16  # width of ``random`` embeddings; artifacts record the encoder's width here
    # The bank as used (normal signs, categories -> signs), frozen into every artifact so a model
    # rebuilds with its own signs even after the bundled bank changes. None: read the bank file.
    bank: dict[str, Any] | None = None


@dataclass
class SDMADConfig:
    vision: TowerSpec
    text: SignTextSpec = field(default_factory=SignTextSpec)
    layers: list[int] = field(default_factory=lambda: [4, 8, 12])  # hidden states concatenated per patch
    feature_dim: int = 64  # frozen features reduced by PCA over normal training patches (stage 1 is cheap on CPU)
    adapter_hidden: int = 64  # shift adapter: x + MLP(x) on the projected patch features
    logit_scale: float = 10.0  # cosine -> logit (fixed; a learnt one overfits with k = 1)
    topk_ratio: float = 0.03  # image sign activation: mean of the top 3 % patches (small foci span few)
    # Stage 2: a sign counts as present in an image when its activation is at least
    # mean + z * std of that sign over the validation split's normal images; z is fitted on that
    # split's categorised anomalies when it has some (``select_z_grid``), else it is ``select_z``.
    select_z: float = 1.0
    select_z_grid: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    # Stage 1 (cached frozen features, Adam): steps, learning rate, losses.
    steps: int = 150
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_normals: int = 12  # normal (and as many synthetic-anomaly) images per step
    margin: float = 1.0  # discrepancy amplification: own-category logit above the best other by this
    w_disc: float = 1.0
    w_sign: float = 0.5  # sign-alignment BCE (a shot's own signs on, other categories' signs off)
    w_map: float = 1.0  # patch BCE on synthetic anomalies, shots' masks and normals
    shot_augment: int = 2  # views of every shot: itself and its mirror image (k can be 1)
    max_normals: int = 200  # normal training images cached for stage 1
    # score / anomaly_map are the raw logits, so rankings never tie. True: their sigmoids, which float32
    # rounds to 1.0 on strongly anomalous images (artifacts saved before this field).
    sigmoid_outputs: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SDMADConfig:
        data = dict(data)
        data["vision"] = TowerSpec(**data["vision"])
        data["text"] = SignTextSpec(**data.get("text", {}))
        cfg = cls(**data)
        if cfg.text.kind not in TEXT_KINDS:
            raise ValueError(f"text kind must be one of {TEXT_KINDS}, got {cfg.text.kind!r}")
        if not cfg.layers or not 0 < cfg.topk_ratio <= 1:
            raise ValueError(f"need layers and 0 < topk_ratio <= 1; got {cfg.layers}, {cfg.topk_ratio}")
        return cfg

"""Configuration of the CLIP + BEiT fusion model (papers.md section 1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from adcore.models.towers import TowerSpec


@dataclass
class TextSpec:
    """Where the text anchors [D, 2] come from.

    ``clip``: the CLIP text tower of the vision tower's checkpoint (paper).
    ``sentence``: a local sentence encoder (all-MiniLM-L6-v2) standing in where no
    CLIP text tower exists offline; its space is not aligned with the image
    tower, so the trained visual projection does the aligning and there is no
    zero-shot scoring before training. ``random``: seeded random orthonormal
    anchors, for tiny test models only.
    """

    kind: str = "clip"
    weights: str | None = None  # sentence encoder folder; None = the packaged MiniLM
    domain: str = "brain_mri"  # prompt bank (adcore/prompts/<domain>.json)
    center: bool = False  # subtract the anchors' mean (stand-in encoders; see encode_anchors)


@dataclass
class FusionConfig:
    vision: TowerSpec
    domain: TowerSpec
    text: TextSpec = field(default_factory=TextSpec)
    n_fusion: int = 6  # fusion after every depth/6 layers: CLIP-L layers 4, 8, ..., 24
    beta: float = 0.4  # weight of the vision (CLIP) hidden state at a fusion point
    gamma: float = 0.6  # weight of the domain (BEiT) hidden state
    alpha: float = 0.5  # residual: alpha * adapter + (1 - alpha) * CLIP state
    proj_dim: int | None = None  # visual projection width; None = the text-anchor width
    score_reduction: str = "mean"  # paper: mean anomalous probability over patches; or "topk"
    topk_fraction: float = 0.1  # share of patches averaged by "topk"
    logit_scale: float = 14.3  # initial temperature (1/0.07, as CLIP), learned
    train_last_layers: int = 1  # paper: CLIP's last layer is trainable
    domain_train_layers: int = 2  # stage 1 fine-tunes this many last domain layers
    alpha_few: float = 0.15  # few-shot centroid blend (paper)
    n_centroids: int = 16  # per class (paper)
    # --- Extensions beyond the paper (all off by default: fusion-large stays the paper's model;
    # the fusion-small preset turns them on, fusion-small-paper leaves them off). docs/models/fusion.md.
    memory_layers: list[int] = field(default_factory=list)  # domain-tower layers of a normal-patch memory
    memory_weight: float = 0.5  # blend of the memory branch's probability into map and score
    memory_kernel: int = 3  # locally aware neighbourhood average of the memory features (PatchCore)
    memory_zero_padding: bool = False  # its border cells divide by the whole window, as PatchCore's (True)
    memory_coreset_ratio: float = 0.05  # share of normal patches kept in the memory bank (PatchCore)
    # Fixed cap on memory-bank rows; None: memory_coreset_ratio of the training patches however many
    # there are (grows with the training set, as PatchCore's bank).
    memory_max_bank: int | None = None
    # Without a GPU the greedy selection (patches x rows work) is capped at this many rows; with one it
    # selects the whole ratio on the GPU.
    memory_cpu_max_bank: int = 8192
    memory_reduction: str = "max"  # image score of the memory branch (PatchCore: the most anomalous patch)
    memory_reweight_k: int = 0  # PatchCore's eq. 7 on that score: bank neighbours weighed (official 9; 0 off)
    adapter_residual: bool = False  # h = C_i + F_i with zero-initialised adapter outputs (identity at start)
    # Side adapters (APRIL-GAN-style): each adapter reads the frozen streams and its output never re-enters
    # the vision tower, so stage 2 runs the towers without gradients (needs train_last_layers 0), and
    # equal vision and domain towers with domain_train_layers 0 (no stage 1) run once per image.
    adapter_side: bool = False
    # Stage-2 weights averaged over epochs (an exponential average with this decay after each epoch; 0 off):
    # validation, epoch selection and the saved model see the average, training continues from the raw weights.
    epoch_average: float = 0.0
    train_scored: bool = False  # image loss on the exported score (no cls-head term in the image logit)
    clean_centroids: bool = False  # normal centroids from images without synthetic anomalies
    centroid_method: str = "vae"  # "vae" (paper) or "kmeans" (spherical k-means on the embeddings)
    synthesis: str = "default"  # training anomalies: "default" (DRAEM-style) or "smooth" (half smooth intensity blobs)
    memory_weight_choices: list[float] = field(default_factory=list)  # memory weights chosen between on validation
    memory_scale_choices: list[float] = field(default_factory=list)  # and multipliers of the memory sigmoid's scale
    map_sigma_px: float = 0.0  # Gaussian smoothing of the final map, sigma in input pixels (PatchCore's 4)
    # Network input size; None: the larger tower's (BEiT's 384 beside CLIP's 336), each tower resizing down
    # from it, as the paper resizes the original for each tower. Saved before the field: the vision tower's.
    input_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionConfig:
        data = dict(data)
        data["vision"] = TowerSpec(**data["vision"])
        data["domain"] = TowerSpec(**data["domain"])
        data["text"] = TextSpec(**data.get("text", {}))
        return cls(**data)

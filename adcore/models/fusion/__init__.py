"""CLIP + BEiT fusion with adapters, text anchors and VAE centroids (papers.md section 1)."""

from pathlib import Path

from adcore.models.family import SCHEDULE_FLAGS, MethodFamily
from adcore.models.fusion.config import FusionConfig
from adcore.models.fusion.fit import fit_centroids
from adcore.models.fusion.head import CentroidHead
from adcore.models.fusion.model import FusionModel
from adcore.models.fusion.train import train_fusion

FAMILY = MethodFamily(
    name="fusion",
    config_class=FusionConfig,
    model_class=FusionModel,
    head_class=CentroidHead,
    fit=fit_centroids,
    train=train_fusion,
    presets=Path(__file__).parent / "presets",
    train_flags=SCHEDULE_FLAGS,
    domain_field=("text", "domain"),
    description="CLIP + BEiT fusion, zero/few-shot scoring against VAE centroids",
)

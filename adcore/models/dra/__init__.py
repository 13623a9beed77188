"""DRA: open-set supervised detection from a few labelled anomalies (Ding, Pang, Shen, CVPR 2022)."""

from pathlib import Path

from adcore.models.dra.config import DRAConfig
from adcore.models.dra.fit import fit_dra
from adcore.models.dra.head import DRAHead
from adcore.models.dra.model import DRAModel
from adcore.models.dra.train import train_dra
from adcore.models.family import MethodFamily

FAMILY = MethodFamily(
    name="dra",
    config_class=DRAConfig,
    model_class=DRAModel,
    head_class=DRAHead,
    fit=fit_dra,
    train=train_dra,
    presets=Path(__file__).parent / "presets",
    train_flags=("minutes",),
    own_schedule="DRA trains with the official code's schedule from its model config; set it with "
    '--overrides \'{"epochs": 30, "steps_per_epoch": 20, "lr": 0.0002, "batch_size": 48}\'',
    needs_labelled_anomalies=True,
    needs_images_in_memory=True,
    description="DRA: seen, pseudo and latent-residual anomaly heads against a normal head",
)

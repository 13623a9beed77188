"""SD-MAD: few-shot multi-anomaly detection driven by radiological signs (arXiv 2505.16659)."""

from pathlib import Path

from adcore.models.family import MethodFamily
from adcore.models.sdmad.config import SDMADConfig
from adcore.models.sdmad.fit import fit_sdmad
from adcore.models.sdmad.head import SDMADHead
from adcore.models.sdmad.model import SDMADModel, sign_overrides
from adcore.models.sdmad.train import train_sdmad

FAMILY = MethodFamily(
    name="sdmad",
    config_class=SDMADConfig,
    model_class=SDMADModel,
    head_class=SDMADHead,
    fit=fit_sdmad,
    train=train_sdmad,
    presets=Path(__file__).parent / "presets",
    train_flags=("minutes", "batch_size"),
    own_schedule="SD-MAD's steps and learning rate come from its model config; set them with "
    '--overrides \'{"steps": 150, "lr": 0.003}\'',
    needs_labelled_anomalies=True,
    signs=sign_overrides,
    domain_field=("text", "domain"),  # the sign bank follows the data's modality
    needs_images_in_memory=True,  # stage 1 indexes the shard's images (the shots, the normals it caches)
    description="SD-MAD: sign embeddings aligned with anomaly categories, signs selected at inference",
)

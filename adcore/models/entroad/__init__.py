"""EntroAD: zero-shot detection in unseen domains, routed by structural entropy (papers.md section 5)."""

from pathlib import Path

from adcore.models.entroad.config import EntroADConfig
from adcore.models.entroad.fit import fit_entroad
from adcore.models.entroad.head import EntroADHead
from adcore.models.entroad.model import EntroADModel
from adcore.models.entroad.train import train_entroad
from adcore.models.family import MethodFamily

FAMILY = MethodFamily(
    name="entroad",
    config_class=EntroADConfig,
    model_class=EntroADModel,
    head_class=EntroADHead,
    fit=fit_entroad,
    train=train_entroad,
    presets=Path(__file__).parent / "presets",
    train_flags=("epochs", "minutes", "lr", "batch_size", "warmup_share"),  # one stage: no domain stage
    own_schedule="EntroAD has one gradient stage and no domain stage",
    description="EntroAD: attention-graph structural entropy routes tokens to salient/diffuse paths; "
    "learned and frozen prompts blended by confidence",
)

"""PatchCore: locally aware patch features matched against a coreset memory bank (Roth et al., 2022)."""

from pathlib import Path

from adcore.models.family import MethodFamily
from adcore.models.patchcore.config import PatchCoreConfig
from adcore.models.patchcore.fit import fit_memory_bank
from adcore.models.patchcore.head import MemoryBankHead
from adcore.models.patchcore.model import PatchCoreModel

FAMILY = MethodFamily(
    name="patchcore",
    config_class=PatchCoreConfig,
    model_class=PatchCoreModel,
    head_class=MemoryBankHead,
    fit=fit_memory_bank,
    presets=Path(__file__).parent / "presets",
    train_flags=("batch_size",),  # images per feature-extraction batch of the memory bank
    own_schedule="PatchCore has no gradient stages: its memory bank is built in one pass",
    description="PatchCore: nearest-neighbour distance to a coreset memory bank",
)

"""Model registry: ``create(name, ...)``, ``list_models()``, and the method families behind them."""

from adcore.models.base import AnomalyModel, ModelOutput
from adcore.models.family import MethodFamily
from adcore.models.registry import (
    create,
    families,
    family,
    family_for,
    family_of_config,
    from_config,
    list_models,
    preset,
)

__all__ = [
    "AnomalyModel",
    "MethodFamily",
    "ModelOutput",
    "create",
    "families",
    "family",
    "family_for",
    "family_of_config",
    "from_config",
    "list_models",
    "preset",
]

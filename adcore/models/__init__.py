"""Model registry: ``create(name, ...)``, ``list_models()``."""

from adcore.models.base import AnomalyModel, ModelOutput
from adcore.models.registry import create, from_config, list_models, preset

__all__ = ["AnomalyModel", "ModelOutput", "create", "from_config", "list_models", "preset"]

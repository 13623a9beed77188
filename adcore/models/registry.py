"""An explicit registry of method families and their presets.

Each folder ``adcore/models/<family>/`` that exports ``FAMILY`` (a
:class:`adcore.models.family.MethodFamily`) is a family; its presets are JSON data
under ``<family>/presets``. Adding a method is adding a folder: nothing here names one.

A preset says *what* to build; weights locations are separate arguments, so
``create("fusion-large", weights={"vision": DIR, "domain": DIR})`` builds the
paper's model from local folders or S3 prefixes, and ``tiny=True`` builds the
same architecture at test size with random weights.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any

from adcore.errors import UnknownNameError
from adcore.models.base import AnomalyModel
from adcore.models.family import MethodFamily

_ROOT = Path(__file__).parent


@functools.cache
def families() -> dict[str, MethodFamily]:
    """Every family folder's record, by name."""
    found = {}
    for info in pkgutil.iter_modules([str(_ROOT)]):
        if not info.ispkg:
            continue
        record = getattr(importlib.import_module(f"{__package__}.{info.name}"), "FAMILY", None)
        if isinstance(record, MethodFamily):
            found[record.name] = record
    return found


def family(name: str) -> MethodFamily:
    known = families()
    if name not in known:
        raise UnknownNameError("method family", name, known)
    return known[name]


def family_of_config(config: dict[str, Any]) -> MethodFamily:
    """The family of an artifact's saved model config."""
    return family(config.get("family"))


def family_for(model: AnomalyModel) -> MethodFamily:
    """The family whose model class built ``model``."""
    for record in families().values():
        if isinstance(model, record.model_class):
            return record
    raise ValueError(f"{type(model).__name__} belongs to no registered method family")


def _presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for record in families().values():
        for path in sorted(record.presets.glob("*.json")):
            spec = json.loads(path.read_text())
            presets[path.stem] = {**spec, "family": record.name}
    return presets


def list_models() -> list[str]:
    """Preset names, without the former names kept for scripts (``"same_as"`` presets)."""
    return sorted(name for name, spec in _presets().items() if "same_as" not in spec)


def preset(name: str) -> dict[str, Any]:
    """A preset's spec; a former name (``{"same_as": NEW}``) gives the preset it became."""
    presets = _presets()
    if name not in presets:
        raise UnknownNameError("preset", name, presets)
    spec = presets[name]
    return preset(spec["same_as"]) if "same_as" in spec else copy.deepcopy(spec)


def merge_config(base: dict, override: dict) -> dict:
    """``base`` with ``override`` applied, nested dicts merged key by key."""
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_config(out[key], value) if nested else value
    return out


def create(name: str, *, weights: dict[str, str] | None = None, tiny: bool = False, **overrides: Any) -> AnomalyModel:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        weights: tower name -> local folder or ``s3://`` prefix (``vision``/``domain`` for
            fusion, ``backbone`` for PatchCore), overriding the preset's weights.
        tiny: build the preset's tiny, random-init variant (tests).
        overrides: config fields to override (nested dicts merge).
    """
    spec = preset(name)
    cfg = spec["config"]
    if tiny:
        cfg = merge_config(cfg, spec.get("tiny", {}))
    for tower, uri in (weights or {}).items():
        cfg = merge_config(cfg, {tower: {"weights": uri}})
    cfg = merge_config(cfg, overrides)
    needs = spec.get("needs_weights", {})
    missing = [t for t in needs if not tiny and not cfg.get(t, {}).get("weights")]
    if missing:
        wanted = "; ".join(f"{t}: {needs[t]}" for t in missing)
        raise ValueError(
            f"model {name!r} needs pretrained weights for {missing} (local folder or s3:// prefix): {wanted}"
        )
    record = family(spec["family"])
    model = record.model_class(record.config_class.from_dict(cfg))
    model.preset_name = name
    return model


def from_config(config: dict[str, Any]) -> AnomalyModel:
    """Rebuild an architecture from an artifact's saved config (weights loaded by the caller)."""
    return family_of_config(config).model_class.from_config_dict(config)

"""An explicit model registry. Presets are JSON data under ``models/<family>/presets``.

A preset says *what* to build; weights locations are separate arguments, so
``create("fusion-large", weights={"vision": DIR, "domain": DIR})`` builds the
paper's model from local folders or S3 prefixes, and ``tiny=True`` builds the
same architecture at test size with random weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

from adcore.models.base import AnomalyModel

_ROOT = Path(__file__).parent


def _families() -> dict[str, tuple[Callable[[dict], AnomalyModel], Callable[[dict], AnomalyModel]]]:
    """family -> (build from a preset config, rebuild from an artifact's config)."""
    from adcore.models.fusion.config import FusionConfig
    from adcore.models.fusion.model import FusionModel
    from adcore.models.patchcore.config import PatchCoreConfig
    from adcore.models.patchcore.model import PatchCoreModel

    return {
        "fusion": (lambda c: FusionModel(FusionConfig.from_dict(c)), FusionModel.from_config_dict),
        "patchcore": (lambda c: PatchCoreModel(PatchCoreConfig.from_dict(c)), PatchCoreModel.from_config_dict),
    }


def _presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for path in sorted(_ROOT.glob("*/presets/*.json")):
        presets[path.stem] = json.loads(path.read_text())
    return presets


def list_models() -> list[str]:
    return sorted(_presets())


def preset(name: str) -> dict[str, Any]:
    presets = _presets()
    if name not in presets:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(presets))}")
    return copy.deepcopy(presets[name])


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
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
        cfg = _merge(cfg, spec.get("tiny", {}))
    for tower, uri in (weights or {}).items():
        cfg = _merge(cfg, {tower: {"weights": uri}})
    cfg = _merge(cfg, overrides)
    needs = spec.get("needs_weights", {})
    missing = [t for t in needs if not tiny and not cfg.get(t, {}).get("weights")]
    if missing:
        wanted = "; ".join(f"{t}: {needs[t]}" for t in missing)
        raise ValueError(f"model {name!r} needs pretrained weights for {missing} (local folder or s3:// prefix): {wanted}")
    build, _ = _families()[spec["family"]]
    model = build(cfg)
    model.preset_name = name
    return model


def from_config(config: dict[str, Any]) -> AnomalyModel:
    """Rebuild an architecture from an artifact's saved config (weights loaded by the caller)."""
    family = config.get("family")
    families = _families()
    if family not in families:
        raise ValueError(f"artifact config has unknown family {family!r}; known: {sorted(families)}")
    return families[family][1](config)

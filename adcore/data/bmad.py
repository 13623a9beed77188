"""Reader for the BMAD benchmark folder layout.

::

    root/train/good/*.png            or  root/train/good/img/*.png
    root/{valid,test}/good/img/*.png
    root/{valid,test}/Ungood/img/*.png
    root/{valid,test}/Ungood/anomaly_mask/*.png   or  .../Ungood/label/*.png   (same file names)

Classification-only sets (e.g. histopathology) have no mask folder. ``img/`` may be absent,
with the images directly under ``good/`` or ``Ungood/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adcore.data.decode import decode_path
from adcore.data.errors import DatasetLayoutError

SPLITS = ("train", "valid", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_DIRS = ("anomaly_mask", "label")  # both conventions occur in BMAD's subsets
NORMAL_DIR, ANOMALY_DIR = "good", "Ungood"


@dataclass
class Sample:
    """One image of a split.

    Attributes:
        path: The image file.
        label: 0 normal, 1 anomalous.
        mask_path: Ground-truth mask of an anomalous image, None when there is none.
        split_has_masks: True when the split carries masks, so a normal image's mask is
            all zeros rather than unknown.
    """

    path: Path
    label: int
    mask_path: Path | None = None
    split_has_masks: bool = False


def _images_in(folder: Path) -> list[Path]:
    """Images in ``folder/img/`` if it exists, else directly in ``folder``."""
    sub = folder / "img"
    src = sub if sub.is_dir() else folder
    return sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _find_mask(mask_dir: Path, image: Path) -> Path:
    for cand in (mask_dir / image.name, mask_dir / (image.stem + ".png")):
        if cand.is_file():
            return cand
    raise DatasetLayoutError(mask_dir, f"a mask named {image.name} for {image}")


def list_split(root, split: str) -> list[Sample]:
    """Lists a split's samples, normal first, each group sorted by file name.

    Raises:
        ValueError: ``split`` is not one of ``SPLITS``.
        DatasetLayoutError: a folder is missing, holds no images, or a mask is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetLayoutError(split_dir, f"a '{split}' folder under {root}")
    good_dir, bad_dir = split_dir / NORMAL_DIR, split_dir / ANOMALY_DIR
    if not good_dir.is_dir():
        raise DatasetLayoutError(good_dir, f"a '{NORMAL_DIR}' folder in the {split} split")
    good = _images_in(good_dir)
    if not good:
        raise DatasetLayoutError(good_dir, "normal images (*.png) directly or under img/")
    if split == "train":
        return [Sample(p, 0) for p in good]
    if not bad_dir.is_dir():
        raise DatasetLayoutError(bad_dir, f"an '{ANOMALY_DIR}' folder in the {split} split")
    bad = _images_in(bad_dir)
    if not bad:
        raise DatasetLayoutError(bad_dir, "anomalous images (*.png) directly or under img/")
    mask_dir = next((bad_dir / d for d in MASK_DIRS if (bad_dir / d).is_dir()), None)
    masked = mask_dir is not None
    samples = [Sample(p, 0, None, masked) for p in good]
    samples += [Sample(p, 1, _find_mask(mask_dir, p) if masked else None, masked) for p in bad]
    return samples


def has_masks(samples: list[Sample]) -> bool:
    """True when the samples carry pixel ground truth (any anomalous image has a mask)."""
    return any(s.mask_path is not None for s in samples)


def load_mask(path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Reads a mask file as bool HxW (any non-zero channel is anomalous)."""
    pixels = decode_path(path)[0].pixels
    mask = (pixels > 0).any(axis=-1) if pixels.ndim == 3 else pixels > 0
    if shape is not None and mask.shape != tuple(shape):
        raise DatasetLayoutError(path, f"a mask of shape {tuple(shape)} like its image, got {mask.shape}")
    return mask


def load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
    """Image (float32 [0, 1], first frame) and mask (bool HxW, or None when unknown)."""
    image = decode_path(sample.path)[0].pixels
    if sample.mask_path is not None:
        return image, load_mask(sample.mask_path, image.shape[:2])
    if sample.label == 0 and sample.split_has_masks:
        return image, np.zeros(image.shape[:2], dtype=bool)
    return image, None

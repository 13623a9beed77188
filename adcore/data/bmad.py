"""Reader for the BMAD benchmark folder layout.

::

    root/train/good/*.png            or  root/train/good/img/*.png
    root/train/Ungood/img/*.png      labelled anomalies (optional; used with labelled=N)
    root/train/Ungood/anomaly_mask/*.png                     (optional masks of those)
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


def _masked(bad_dir: Path, bad: list[Path]) -> list[Sample]:
    """Anomalous samples of ``bad_dir``, with masks when it has a mask folder."""
    mask_dir = next((bad_dir / d for d in MASK_DIRS if (bad_dir / d).is_dir()), None)
    masked = mask_dir is not None
    return [Sample(p, 1, _find_mask(mask_dir, p) if masked else None, masked) for p in bad]


def _labelled(split_dir: Path, labelled: int, seed: int) -> list[Sample]:
    """``labelled`` anomalies of ``train/Ungood``, drawn with ``seed``, sorted by file name."""
    bad_dir = split_dir / ANOMALY_DIR
    bad = _images_in(bad_dir) if bad_dir.is_dir() else []
    if len(bad) < labelled:
        raise DatasetLayoutError(
            bad_dir,
            f"{labelled} labelled anomalies (images under {ANOMALY_DIR}/img, masks optional under "
            f"{ANOMALY_DIR}/anomaly_mask) for labelled={labelled}; found {len(bad)}",
        )
    chosen = sorted(np.random.default_rng(seed).choice(len(bad), labelled, replace=False).tolist())
    return _masked(bad_dir, [bad[i] for i in chosen])


def list_split(root, split: str, *, labelled: int = 0, seed: int = 0) -> list[Sample]:
    """Lists a split's samples, normal first, each group sorted by file name.

    Args:
        root: The dataset folder.
        split: One of ``SPLITS``.
        labelled: Train split only: this many labelled anomalies from ``train/Ungood``, drawn with
            ``seed`` (0: none, the train split is normal images only).
        seed: Seed of that draw.

    Raises:
        ValueError: ``split`` is not one of ``SPLITS``, or ``labelled`` is negative or given for another split.
        DatasetLayoutError: a folder is missing, holds no images, or a mask is missing; fewer than
            ``labelled`` images under ``train/Ungood``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if labelled < 0 or (labelled and split != "train"):
        raise ValueError(f"labelled must be >= 0 and applies to the train split only, got {labelled} for {split!r}")
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
        return [Sample(p, 0) for p in good] + (_labelled(split_dir, labelled, seed) if labelled else [])
    if not bad_dir.is_dir():
        raise DatasetLayoutError(bad_dir, f"an '{ANOMALY_DIR}' folder in the {split} split")
    bad = _images_in(bad_dir)
    if not bad:
        raise DatasetLayoutError(bad_dir, "anomalous images (*.png) directly or under img/")
    anomalous = _masked(bad_dir, bad)
    masked = bool(anomalous) and anomalous[0].split_has_masks
    return [Sample(p, 0, None, masked) for p in good] + anomalous


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

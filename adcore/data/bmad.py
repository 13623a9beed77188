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

**Anomaly categories** (optional, for multi-anomaly methods such as SD-MAD): ``root/categories.csv``
with a header ``path,category`` and one row per anomalous image, ``path`` relative to the root with
``/`` separators (``test/Ungood/img/0042.png,hypointense_cyst``). Each anomalous :class:`Sample`
then carries its ``category``; images the file does not list (and every normal image) have None.
With categories, ``labelled=N`` draws the N labelled training anomalies stratified by category
(``N // C`` each, the remainder to the first categories in sorted order), so ``labelled = k * C``
is k shots per category. Without the file nothing changes.

**Manifest** (optional): ``root/dataset.json`` with ``{"domain": "chest_xray", ...}`` names the imaging
domain (one of ``adcore.prompts.list_domains()``); training picks the text prompts of models that use
them from it unless ``--domain`` is given.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adcore.data.decode import decode_path
from adcore.data.errors import DatasetLayoutError

SPLITS = ("train", "valid", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_DIRS = ("anomaly_mask", "label")  # both conventions occur in BMAD's subsets
NORMAL_DIR, ANOMALY_DIR = "good", "Ungood"
CATEGORIES_FILE = "categories.csv"  # path,category per anomalous image (paths relative to the root)
DATASET_FILE = "dataset.json"  # optional manifest: {"domain": <imaging domain>, ...}


@dataclass
class Sample:
    """One image of a split.

    Attributes:
        path: The image file.
        label: 0 normal, 1 anomalous.
        mask_path: Ground-truth mask of an anomalous image, None when there is none.
        split_has_masks: True when the split carries masks, so a normal image's mask is
            all zeros rather than unknown.
        category: The anomaly category (``categories.csv``), None for normal or unlisted images.
    """

    path: Path
    label: int
    mask_path: Path | None = None
    split_has_masks: bool = False
    category: str | None = None


def read_categories(root) -> dict[str, str]:
    """``categories.csv`` of a dataset (relative path -> category); empty when the file is absent."""
    path = Path(root) / CATEGORIES_FILE
    if not path.is_file():
        return {}
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    if rows and not {"path", "category"} <= set(rows[0]):
        raise DatasetLayoutError(path, "a header 'path,category'")
    out = {}
    for row in rows:
        if not row["path"] or not row["category"]:
            raise DatasetLayoutError(path, f"a path and a category on every row, got {row}")
        out[row["path"].strip()] = row["category"].strip()
    return out


def write_categories(root, categories: dict[str, str]) -> Path:
    """Writes ``categories.csv`` (relative path -> category), rows sorted by path."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "category"])
    writer.writerows(sorted(categories.items()))
    path = Path(root) / CATEGORIES_FILE
    path.write_text(buf.getvalue())
    return path


def read_domain(root) -> str | None:
    """The imaging domain named by ``dataset.json`` (None without the file or the field)."""
    from adcore import storage  # the data may sit on S3

    path = storage.join(root, DATASET_FILE)
    if not storage.exists(path):
        return None
    try:
        domain = json.loads(storage.read_bytes(path)).get("domain")
    except (ValueError, AttributeError) as e:
        raise DatasetLayoutError(path, 'a JSON object such as {"domain": "chest_xray"}') from e
    if domain is not None and not isinstance(domain, str):
        raise DatasetLayoutError(path, f"a string 'domain', got {domain!r}")
    return domain


def write_domain(root, domain: str) -> Path:
    """Writes ``dataset.json`` naming the imaging ``domain`` (a local folder); an equal file is left as it is."""
    path, text = Path(root) / DATASET_FILE, json.dumps({"domain": domain}, indent=1) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def list_categories(root) -> list[str]:
    """The dataset's anomaly categories, sorted (empty without ``categories.csv``)."""
    return sorted(set(read_categories(root).values()))


def _with_categories(root: Path, samples: list[Sample], categories: dict[str, str]) -> list[Sample]:
    for s in samples:
        if s.label == 1:
            s.category = categories.get(s.path.relative_to(root).as_posix())
    return samples


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


def _labelled(split_dir: Path, labelled: int, seed: int, categories: dict[str, str]) -> list[Sample]:
    """``labelled`` anomalies of ``train/Ungood``, drawn with ``seed``, sorted by file name
    (stratified by category when the dataset has categories)."""
    bad_dir = split_dir / ANOMALY_DIR
    bad = _images_in(bad_dir) if bad_dir.is_dir() else []
    if len(bad) < labelled:
        raise DatasetLayoutError(
            bad_dir,
            f"{labelled} labelled anomalies (images under {ANOMALY_DIR}/img, masks optional under "
            f"{ANOMALY_DIR}/anomaly_mask) for labelled={labelled}; found {len(bad)}",
        )
    rng = np.random.default_rng(seed)
    root = split_dir.parent
    of = [categories.get(p.relative_to(root).as_posix()) for p in bad]
    names = sorted({c for c in of if c is not None})
    if not names:
        chosen = sorted(rng.choice(len(bad), labelled, replace=False).tolist())
        return _masked(bad_dir, [bad[i] for i in chosen])
    chosen = []
    for j, name in enumerate(names):
        want = labelled // len(names) + (j < labelled % len(names))
        pool = [i for i, c in enumerate(of) if c == name]
        if len(pool) < want:
            raise DatasetLayoutError(bad_dir, f"{want} labelled anomalies of category {name!r}; found {len(pool)}")
        chosen += rng.choice(pool, want, replace=False).tolist()
    return _masked(bad_dir, [bad[i] for i in sorted(chosen)])


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
    categories = read_categories(root)
    if split == "train":
        few = _labelled(split_dir, labelled, seed, categories) if labelled else []
        return [Sample(p, 0) for p in good] + _with_categories(root, few, categories)
    if split == "valid" and not (bad_dir.is_dir() and _images_in(bad_dir)):
        # Normal-only validation (the common case in hospitals): thresholds come from a target specificity.
        return [Sample(p, 0) for p in good]
    if not bad_dir.is_dir():
        raise DatasetLayoutError(bad_dir, f"an '{ANOMALY_DIR}' folder in the {split} split")
    bad = _images_in(bad_dir)
    if not bad:
        raise DatasetLayoutError(bad_dir, "anomalous images (*.png) directly or under img/")
    anomalous = _with_categories(root, _masked(bad_dir, bad), categories)
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

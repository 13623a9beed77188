"""BMAD's released folders, and the views of them adcore trains and evaluates on (used by ``bench/bmad.py``).

BMAD (``DorisBao/BMAD``) ships six datasets, each in its own folder with its own spelling::

    Brain_AD/[BraTS2021_slice/]      train/good  valid|test/{good,Ungood}/{img,label}
    Liver_AD/[hist_DIY/]             train/good  valid|test/{img,label}/{good,Ungood}
    Retina_RESC_AD/[RESC/]           train/good  Val|Test/{img,label}/{good,ungood}
    Retina_OCT2017_AD/[OCT2017/]     train/good  val|test/{good,Ungood}             (no masks)
    Chest_AD/[Chest-RSNA/]           train/good  val|test/{good,Ungood}             (no masks)
    Histopathology_AD/[camelyon16_256/]  train/good  valid|test/{good,Ungood}       (no masks)

:func:`find_dataset` finds a dataset's folder under a root, :func:`read_layout` lists its splits
whatever the spelling, and :func:`write_view` writes them in adcore's layout
(``adcore/data/bmad.py``), each image resized to the protocol's size (or hard-linked as it is).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adcore.data.bmad import ANOMALY_DIR, IMAGE_SUFFIXES, NORMAL_DIR, load_mask
from adcore.data.decode import decode_path
from adcore.data.errors import DatasetLayoutError
from adcore.data.imageops import resize, resize_mask, save_mask_png, save_png


@dataclass(frozen=True)
class DatasetSpec:
    folders: tuple[str, ...]  # the released folder and the names of the folder inside it
    domain: str  # adcore's prompt / sign domain of the modality
    masks: bool  # pixel ground truth in valid/ and test/


DATASETS = {
    "brats": DatasetSpec(("Brain_AD", "BraTS2021_slice", "Brain"), "brain_mri", True),
    "liver": DatasetSpec(("Liver_AD", "hist_DIY", "liver", "Liver"), "liver_ct", True),
    "resc": DatasetSpec(("Retina_RESC_AD", "RESC"), "retinal_oct", True),
    "oct2017": DatasetSpec(("Retina_OCT2017_AD", "OCT2017"), "retinal_oct", False),
    "rsna": DatasetSpec(("Chest_AD", "Chest-AD", "Chest-RSNA", "RSNA"), "chest_xray", False),
    "camelyon16": DatasetSpec(("Histopathology_AD", "camelyon16_256", "camelyon16"), "histopathology", False),
}
SPLIT_NAMES = {"train": ("train", "Train"), "valid": ("valid", "val", "Val", "Valid"), "test": ("test", "Test")}
NORMAL_NAMES, ANOMALY_NAMES = ("good",), ("Ungood", "ungood")
MASK_NAMES = ("label", "anomaly_mask")
VIEW_MASK_DIR = "label"  # masks of a view's valid/test anomalies (train/Ungood's go to anomaly_mask)


@dataclass
class Split:
    normal: list[Path] = field(default_factory=list)
    anomalous: list[Path] = field(default_factory=list)
    masks: dict[Path, Path] = field(default_factory=dict)  # anomalous image -> its mask


def find_dataset(root, name: str) -> Path:
    """The folder of BMAD dataset ``name`` under ``root``: one of its names, at most two levels down,
    holding a train split."""
    spec = DATASETS[name]
    root = Path(root)
    for base in [root] + [p for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []:
        for folder in spec.folders:
            cand = base / folder
            for sub in [cand, *(sorted(p for p in cand.iterdir() if p.is_dir()) if cand.is_dir() else [])]:
                if _first(sub, SPLIT_NAMES["train"]):
                    return sub
    raise DatasetLayoutError(root, f"BMAD's {name} folder ({' or '.join(spec.folders[:2])}) with a train split")


def _first(parent: Path, names) -> Path | None:
    return next((parent / n for n in names if (parent / n).is_dir()), None)


def _files(folder: Path | None) -> list[Path]:
    if folder is None:
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dir(split_dir: Path, names, kind: tuple[str, ...]) -> Path | None:
    """``<class>/<kind>``, ``<kind>/<class>`` or ``<class>``, the first that holds files."""
    for cls in names:
        for cand in [*(split_dir / cls / k for k in kind), *(split_dir / k / cls for k in kind), split_dir / cls]:
            if cand.is_dir() and _files(cand):
                return cand
    return None


def read_layout(folder: Path) -> dict[str, Split]:
    """The train, valid and test splits of a dataset folder, whatever BMAD's spelling."""
    out = {}
    for split, names in SPLIT_NAMES.items():
        split_dir = _first(folder, names)
        if split_dir is None:
            raise DatasetLayoutError(folder, f"a {' or '.join(names)} folder")
        s = Split(_files(_class_dir(split_dir, NORMAL_NAMES, ("img",))))
        if split != "train":
            s.anomalous = _files(_class_dir(split_dir, ANOMALY_NAMES, ("img",)))
            mask_dir = _class_dir(split_dir, ANOMALY_NAMES, MASK_NAMES)
            if mask_dir is not None and mask_dir != _class_dir(split_dir, ANOMALY_NAMES, ("img",)):
                by_stem = {p.stem: p for p in _files(mask_dir)}
                s.masks = {p: by_stem[p.stem] for p in s.anomalous if p.stem in by_stem}
        if not s.normal or (split == "test" and not s.anomalous):
            raise DatasetLayoutError(split_dir, "normal images (and, in the test split, anomalous ones)")
        out[split] = s
    return out


def _put(src: Path, dst: Path, size: int, mask: bool = False) -> None:
    """``src`` at ``dst``: resized to ``size`` x ``size`` PNG, or (size 0) hard-linked as it is."""
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not size:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem
            shutil.copyfile(src, dst)
        return
    if mask:
        save_mask_png(dst, resize_mask(load_mask(src), (size, size)))
    else:
        save_png(dst, np.clip(resize(decode_path(src)[0].pixels, (size, size)), 0, 1))


def _name(path: Path, size: int) -> str:
    return path.stem + ".png" if size else path.name


def write_view(layout: dict[str, Split], out: Path, size: int) -> Path:
    """The dataset in adcore's layout under ``out`` (kept: a view already written is reused)."""
    done = out / "view.json"
    if done.is_file() and json.loads(done.read_text()) == {"size": size}:
        return out
    for split, s in layout.items():
        for p in s.normal:
            _put(p, out / split / NORMAL_DIR / "img" / _name(p, size), size)
        for p in s.anomalous:
            _put(p, out / split / ANOMALY_DIR / "img" / _name(p, size), size)
            if p in s.masks:
                _put(s.masks[p], out / split / ANOMALY_DIR / VIEW_MASK_DIR / _name(p, size), size, mask=True)
    done.write_text(json.dumps({"size": size}))
    return out


def link_tree(src: Path, dst: Path, skip=()) -> None:
    """Hard links of every file under ``src`` at the same place under ``dst``, but those in ``skip``."""
    for path in sorted(src.rglob("*")):
        if path.is_file() and path not in skip and path.name != "view.json":
            _put(path, dst / path.relative_to(src), 0)


def fewshot_view(full: Path, k: int, seed: int, out: Path) -> Path:
    """The few-shot setting of a full view: k normal training images, and k anomalies of the validation
    split moved to ``train/Ungood`` (with their masks, when there are) for ``--labelled k``; the
    test split untouched. Draws are seeded."""
    rng = np.random.default_rng(seed)
    normal = _files(full / "train" / NORMAL_DIR / "img")
    bad = _files(full / "valid" / ANOMALY_DIR / "img")
    if len(normal) < k or len(bad) < k:
        raise DatasetLayoutError(full, f"{k} normal training images and {k} validation anomalies for {k} shots")
    keep = [normal[i] for i in sorted(rng.choice(len(normal), k, replace=False))]
    shots = [bad[i] for i in sorted(rng.choice(len(bad), k, replace=False))]
    moved = set(shots) | {full / "valid" / ANOMALY_DIR / VIEW_MASK_DIR / p.name for p in shots}
    link_tree(full / "valid", out / "valid", skip=moved)
    link_tree(full / "test", out / "test")
    for p in keep:
        _put(p, out / "train" / NORMAL_DIR / "img" / p.name, 0)
    for p in shots:
        _put(p, out / "train" / ANOMALY_DIR / "img" / p.name, 0)
        mask = full / "valid" / ANOMALY_DIR / VIEW_MASK_DIR / p.name
        if mask.is_file():
            _put(mask, out / "train" / ANOMALY_DIR / "anomaly_mask" / p.name, 0)
    return out

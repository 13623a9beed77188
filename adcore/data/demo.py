"""Seeded demo dataset in BMAD layout, made from real anatomy.

Normal images are axial slices of the MNI ICBM152 2009 T1 template (an average of real brain
MRIs, shipped inside nilearn) from the central slab of the brain, each elastically deformed and
given its own contrast, bias field and noise. Anomalous images carry a synthetic lesion
(:mod:`adcore.data.synth`): an irregular textured mass, darker or brighter than the tissue,
sometimes with a necrotic core or mass effect. Masks are written as 0/255 PNGs.

With ``kinds`` (names of :data:`adcore.data.synth.LESION_KINDS`), each anomalous image gets one
kind in turn (hyperintense mass, hypointense cyst, diffuse region) instead of the mixed lesion;
``n_train_anomalous`` writes labelled anomalies to ``train/Ungood`` (images and masks). The kind of
every anomalous image is recorded in ``lesions.json`` (path relative to the root -> kind), which is
written only when either option is used, so default folders are byte for byte what they were.
With ``categories`` (needs ``kinds``) the kinds are also the anomaly categories of the dataset:
``categories.csv`` at the root (columns ``path,category``, the BMAD reader's convention, see
:mod:`adcore.data.bmad`) lists every anomalous image with its kind.

    python -m adcore.data.demo --output /tmp/brain_demo --seed 0
    python -m adcore.data.demo --output /tmp/kinds --kinds hyperintense_mass --kinds hypointense_cyst \
        --kinds diffuse_region --n-train-anomalous 30
    python -m adcore.data.demo --output /tmp/cats --kinds hyperintense_mass --kinds hypointense_cyst \
        --kinds diffuse_region --kinds calcified_foci --n-train-anomalous 32 --categories
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from adcore.data.bmad import ANOMALY_DIR, CATEGORIES_FILE, NORMAL_DIR, write_categories, write_domain
from adcore.data.imageops import resize, save_mask_png, save_png
from adcore.data.synth import LESION_KINDS, LesionConfig, foci_mask, lesion_mask, mass_effect, paint_lesion

DEMO_VERSION = 1  # bump when the generator changes so existing folders are regenerated
DOMAIN = "brain_mri"  # dataset.json: the prompts of models that use text
_TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_SLAB_MIN_AREA = 0.75  # central slab: axial slices with >= 75% of the largest brain cross-section
_BRAIN_LEVEL = 0.02  # template is skull-stripped: anything above this is brain
_LESION = LesionConfig(mass_effect_p=0.5)
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}  # seeds each split apart
_TRAIN_ANOMALOUS_ID = 3  # seed stream of train/Ungood images
LESIONS_FILE = "lesions.json"  # anomalous image (path relative to the root) -> lesion kind


def reuse_or_clear(root: Path, meta: Path, record: dict, splits, extra_files=()) -> bool:
    """True when ``meta`` already records ``record`` (the dataset at ``root`` is current); else clears
    what an older generation wrote (``meta``, the lesion and ``extra_files``, the split folders) and
    returns False. Split folders without ``meta`` are someone else's: refused, never overwritten."""
    if meta.is_file():
        if json.loads(meta.read_text()) == record:
            return True
        meta.unlink()
        for name in (LESIONS_FILE, *extra_files):
            (root / name).unlink(missing_ok=True)
        for split in splits:
            shutil.rmtree(root / split, ignore_errors=True)
    elif any((root / s).exists() for s in splits):
        raise FileExistsError(f"{root} holds split folders without {meta.name}; not overwriting them")
    return False


MIXED_KIND = "mixed"  # the kind recorded for the default generator's lesions


@dataclass
class DemoConfig:
    """What a demo folder was made with; recorded in ``demo.json``."""

    n_train: int = 200
    n_valid: int = 40  # half normal, half anomalous
    n_test: int = 100  # half normal, half anomalous
    size: int = 224
    seed: int = 0
    kinds: list[str] = field(default_factory=list)  # lesion kinds taken in turn (LESION_KINDS); none: mixed lesions
    n_train_anomalous: int = 0  # labelled anomalies written to train/Ungood (kinds in turn)
    categories: bool = False  # write categories.csv: each anomalous image's kind is its category

    def record(self) -> dict:
        """What ``demo.json`` holds: the new options only when used, so default records are unchanged."""
        out = asdict(self)
        if not self.kinds and not self.n_train_anomalous:
            del out["kinds"], out["n_train_anomalous"]
        if not self.categories:
            del out["categories"]
        return out


def _template_path() -> Path | None:
    """The T1 template inside nilearn's package data, found without importing nilearn (slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / _TEMPLATE_FILE
    return path if path.is_file() else None


@lru_cache(maxsize=4)
def _slices(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square axial slices of the central slab, [N, size, size] images and brain masks."""
    import nibabel as nib

    path = _template_path()
    if path is not None:
        img = nib.load(str(path))
    else:  # other nilearn layouts: its loader reads the same packaged file, offline
        from nilearn.datasets import load_mni152_template

        img = load_mni152_template(resolution=1)
    vol = np.asarray(nib.as_closest_canonical(img).get_fdata(dtype=np.float32))
    vol /= vol.max()
    area = (vol > _BRAIN_LEVEL).sum(axis=(0, 1))
    zs = np.nonzero(area >= _SLAB_MIN_AREA * area.max())[0]
    images, masks = [], []
    for z in zs:
        s = np.rot90(vol[:, :, z])  # [Y, X], anterior up
        side = max(s.shape)
        pad = [((side - n) // 2, side - n - (side - n) // 2) for n in s.shape]
        s = resize(np.pad(s, pad), (size, size))
        images.append(np.clip(s, 0, 1))
        masks.append(ndimage.binary_fill_holes(s > _BRAIN_LEVEL))
    return np.stack(images), np.stack(masks)


def _smooth_field(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    """Smooth random field of unit-ish amplitude: cubic upsampling of a coarse grid."""
    return ndimage.zoom(rng.standard_normal((cells, cells)), size / cells, order=3)[:size, :size]


def rand_deform(rng: np.random.Generator, image: np.ndarray, brain: np.ndarray):
    """Small random affine + elastic warp, applied to image and brain mask alike."""
    n = image.shape[0]
    angle = np.deg2rad(rng.uniform(-10, 10))  # head tilt within a scanner's usual range
    scale = rng.uniform(0.9, 1.1)  # head size variation
    shift = rng.uniform(-0.04, 0.04, size=2) * n
    elastic = rng.uniform(1.0, 3.5)  # peak-ish elastic displacement in pixels
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) - (n - 1) / 2
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    src_y = cos * yy - sin * xx + (n - 1) / 2 + shift[0] + elastic * _smooth_field(rng, n)
    src_x = sin * yy + cos * xx + (n - 1) / 2 + shift[1] + elastic * _smooth_field(rng, n)
    warp = lambda a: ndimage.map_coordinates(a, [src_y, src_x], order=1, mode="constant")  # noqa: E731
    return warp(image).astype(np.float32), warp(brain.astype(np.float32)) > 0.5


def rand_intensity(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Gamma, contrast, MRI bias field and Rician noise."""
    n = image.shape[0]
    out = image ** rng.uniform(0.75, 1.3)  # gamma: varies the grey/white matter contrast
    out = out * rng.uniform(0.85, 1.15)
    out = out * (1 + rng.uniform(0.0, 0.12) * _smooth_field(rng, n, cells=3))  # coil bias field
    sigma = rng.uniform(0.005, 0.03)
    noisy = np.hypot(out + sigma * rng.standard_normal(out.shape), sigma * rng.standard_normal(out.shape))
    return np.clip(noisy, 0, 1).astype(np.float32)  # magnitude MRI noise is Rician


def make_sample(rng: np.random.Generator, size: int = 224, anomalous: bool = False, kind: str | None = None):
    """One demo image and, when anomalous, its lesion mask (else None); ``kind`` names a LESION_KINDS entry."""
    images, brains = _slices(size)
    z = int(rng.integers(len(images)))
    image, brain = rand_deform(rng, images[z], brains[z])
    mask = None
    if anomalous:
        lesion = _LESION if kind is None else LESION_KINDS[kind]
        if lesion.n_foci[1] > 1:  # scattered foci (e.g. calcified_foci)
            mask, center, radius = foci_mask(rng, brain, lesion)
        else:
            mask, center, radius = lesion_mask(rng, brain, lesion.area_frac, lesion.irregularity)
        if rng.random() < lesion.mass_effect_p:
            image, brain = mass_effect(image, brain, center, radius, rng.uniform(*lesion.mass_effect))
            mask &= brain
        image = paint_lesion(rng, image, mask, radius, lesion)
    return rand_intensity(rng, image), mask


def write_split(root: Path, split: str, n: int, seed: int, sample: Callable, kinds: dict[str, str]) -> None:
    """Writes ``n`` images of a BMAD split (outside ``train`` the last half anomalous, with masks) and
    records each anomalous image's lesion kind in ``kinds``.

    ``sample(rng, j)`` makes image ``i`` from ``rng`` (seeded by ``seed``, the split and ``i``): ``j`` is
    None for a normal image, else the anomalous image's rank in the split; it returns
    ``(image, mask, kind)``.
    """
    n_bad = 0 if split == "train" else n // 2
    for i in range(n):
        anomalous = i >= n - n_bad
        rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
        image, mask, kind = sample(rng, i - (n - n_bad) if anomalous else None)
        name = f"{i:04d}.png"
        folder = root / split / (ANOMALY_DIR if anomalous else NORMAL_DIR)
        save_png(folder / "img" / name, image)
        if anomalous:
            save_mask_png(folder / "label" / name, mask)
            kinds[f"{split}/{ANOMALY_DIR}/img/{name}"] = kind


def _sampler(cfg: DemoConfig) -> Callable:
    def sample(rng, j):
        kind = cfg.kinds[j % len(cfg.kinds)] if j is not None and cfg.kinds else None
        image, mask = make_sample(rng, cfg.size, j is not None, kind)
        return image, mask, kind or MIXED_KIND

    return sample


def _write_train_anomalous(root: Path, cfg: DemoConfig, kinds: dict[str, str]) -> None:
    """Labelled training anomalies: train/Ungood/img and train/Ungood/anomaly_mask."""
    folder = root / "train" / ANOMALY_DIR
    for i in range(cfg.n_train_anomalous):
        rng = np.random.default_rng([cfg.seed, _TRAIN_ANOMALOUS_ID, i])
        kind = cfg.kinds[i % len(cfg.kinds)] if cfg.kinds else None
        image, mask = make_sample(rng, cfg.size, True, kind)
        name = f"{i:04d}.png"
        save_png(folder / "img" / name, image)
        save_mask_png(folder / "anomaly_mask" / name, mask)
        kinds[f"train/{ANOMALY_DIR}/img/{name}"] = kind or MIXED_KIND


def lesion_kinds(root) -> dict[str, str]:
    """Lesion kind of every anomalous image of a demo folder (path relative to ``root`` -> kind)."""
    path = Path(root) / LESIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: make the demo folder with --kinds or --n-train-anomalous")
    return json.loads(path.read_text())


def make_demo_dataset(
    root,
    *,
    n_train: int = 200,
    n_valid: int = 40,
    n_test: int = 100,
    size: int = 224,
    seed: int = 0,
    kinds: list[str] | tuple[str, ...] = (),
    n_train_anomalous: int = 0,
    categories: bool = False,
) -> Path:
    """Writes the demo dataset under `root` (BMAD layout) and returns `root`.

    Idempotent: when ``root/demo.json`` records the same config, nothing is written. A folder
    made with another config is rebuilt; split folders not made by this function are refused.
    """
    root = Path(root)
    unknown = sorted(set(kinds) - set(LESION_KINDS))
    if unknown:
        raise ValueError(f"unknown lesion kinds {unknown}; known: {sorted(LESION_KINDS)}")
    if n_train_anomalous < 0:
        raise ValueError(f"n_train_anomalous must be >= 0, got {n_train_anomalous}")
    if categories and not kinds:
        raise ValueError("categories=True needs lesion kinds (--kinds): the kinds are the categories")
    cfg = DemoConfig(n_train, n_valid, n_test, size, seed, list(kinds), n_train_anomalous, categories)
    record = {"version": DEMO_VERSION, **cfg.record()}
    meta = root / "demo.json"
    if reuse_or_clear(root, meta, record, SPLIT_IDS, (CATEGORIES_FILE,)):
        write_domain(root, DOMAIN)
        return root
    kind_of: dict[str, str] = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        write_split(root, split, n, cfg.seed, _sampler(cfg), kind_of)
    _write_train_anomalous(root, cfg, kind_of)
    if cfg.kinds or cfg.n_train_anomalous:
        (root / LESIONS_FILE).write_text(json.dumps(kind_of, indent=1, sort_keys=True))
    if cfg.categories:
        write_categories(root, kind_of)
    write_domain(root, DOMAIN)
    meta.write_text(json.dumps(record, indent=1))  # last: a half-written folder is redone
    return root


@dataclass
class DemoOutput:
    """Where the dataset goes."""

    output: str  # folder to write the BMAD-layout dataset to


def main(argv=None) -> None:
    from adcore.cli import parse_configs

    where, cfg = parse_configs(
        (DemoOutput, DemoConfig), argv, __doc__.split("\n")[0], prog="python -m adcore.data.demo"
    )
    root = make_demo_dataset(where.output, **asdict(cfg))
    print(f"demo dataset in {root}")


if __name__ == "__main__":
    main()

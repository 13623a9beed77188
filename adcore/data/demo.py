"""Seeded demo dataset in BMAD layout, made from real anatomy.

Normal images are axial slices of the MNI ICBM152 2009 T1 template (an average of real brain
MRIs, shipped inside nilearn) from the central slab of the brain, each elastically deformed and
given its own contrast, bias field and noise. Anomalous images carry a synthetic lesion
(:mod:`adcore.data.synth`): an irregular textured mass, darker or brighter than the tissue,
sometimes with a necrotic core or mass effect. Masks are written as 0/255 PNGs.

    python -m adcore.data.demo --out /tmp/brain_demo --seed 0
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from adcore.data.bmad import ANOMALY_DIR, NORMAL_DIR
from adcore.data.imageops import resize, save_mask_png, save_png
from adcore.data.synth import LesionConfig, lesion_mask, mass_effect, paint_lesion

DEMO_VERSION = 1  # bump when the generator changes so existing folders are regenerated
_TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_SLAB_MIN_AREA = 0.75  # central slab: axial slices with >= 75% of the largest brain cross-section
_BRAIN_LEVEL = 0.02  # template is skull-stripped: anything above this is brain
_LESION = LesionConfig(mass_effect_p=0.5)
_SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}


@dataclass
class DemoConfig:
    """What a demo folder was made with; recorded in ``demo.json``."""

    n_train: int = 200
    n_valid: int = 40  # half normal, half anomalous
    n_test: int = 100  # half normal, half anomalous
    size: int = 224
    seed: int = 0


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


def make_sample(rng: np.random.Generator, size: int = 224, anomalous: bool = False):
    """One demo image and, when anomalous, its lesion mask (else None)."""
    images, brains = _slices(size)
    z = int(rng.integers(len(images)))
    image, brain = rand_deform(rng, images[z], brains[z])
    mask = None
    if anomalous:
        mask, center, radius = lesion_mask(rng, brain, _LESION.area_frac, _LESION.irregularity)
        if rng.random() < _LESION.mass_effect_p:
            image, brain = mass_effect(image, brain, center, radius, rng.uniform(*_LESION.mass_effect))
            mask &= brain
        image = paint_lesion(rng, image, mask, radius, _LESION)
    return rand_intensity(rng, image), mask


def _write_split(root: Path, split: str, n: int, cfg: DemoConfig) -> None:
    n_bad = 0 if split == "train" else n // 2
    for i in range(n):
        anomalous = i >= n - n_bad
        rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], i])
        image, mask = make_sample(rng, cfg.size, anomalous)
        name = f"{i:04d}.png"
        folder = root / split / (ANOMALY_DIR if anomalous else NORMAL_DIR)
        save_png(folder / "img" / name, image)
        if anomalous:
            save_mask_png(folder / "label" / name, mask)


def make_demo_dataset(
    root, *, n_train: int = 200, n_valid: int = 40, n_test: int = 100, size: int = 224, seed: int = 0
) -> Path:
    """Writes the demo dataset under `root` (BMAD layout) and returns `root`.

    Idempotent: when ``root/demo.json`` records the same config, nothing is written. A folder
    made with another config is rebuilt; split folders not made by this function are refused.
    """
    root = Path(root)
    cfg = DemoConfig(n_train, n_valid, n_test, size, seed)
    record = {"version": DEMO_VERSION, **asdict(cfg)}
    meta = root / "demo.json"
    if meta.is_file():
        if json.loads(meta.read_text()) == record:
            return root
        meta.unlink()
        for split in _SPLIT_IDS:
            shutil.rmtree(root / split, ignore_errors=True)
    elif any((root / s).exists() for s in _SPLIT_IDS):
        raise FileExistsError(f"{root} holds split folders without demo.json; not overwriting them")
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        _write_split(root, split, n, cfg)
    meta.write_text(json.dumps(record, indent=1))  # last: a half-written folder is redone
    return root


@dataclass
class DemoOutput:
    """Where the dataset goes."""

    out: str  # folder to write the BMAD-layout dataset to


def main(argv=None) -> None:
    from adcore.cli import parse_configs

    where, cfg = parse_configs(
        (DemoOutput, DemoConfig), argv, __doc__.split("\n")[0], prog="python -m adcore.data.demo"
    )
    root = make_demo_dataset(where.out, **asdict(cfg))
    print(f"demo dataset in {root}")


if __name__ == "__main__":
    main()

"""Seeded chest-radiograph demo dataset in BMAD layout, made from a real radiograph.

The second demo modality, for cross-domain (zero-shot) checks against the brain demo
(:mod:`adcore.data.demo`). Normal images come from the one real chest radiograph shipped offline,
pydicom-data's ``RG1_UNCI.dcm`` (a PA computed radiograph, 1955x1841, MONOCHROME1), each elastically
deformed (:func:`adcore.data.demo.rand_deform`) and given its own exposure, heel-effect gradient,
blur and quantum noise. Anomalous images carry one lesion kind, a ``pulmonary_nodule``: a round,
well-circumscribed opacity inside the lung fields whose brightness follows the projected thickness
of a sphere, added on top of the ribs and vessels (a radiograph is a projection; the nodule does not
hide what lies behind it). Masks are 0/255 PNGs; ``lesions.json`` records each anomalous image's kind.

Caveat: the source radiograph itself shows several rounded opacities (it is a test file, not a
screened normal). "Normal" here means this patient's baseline; the synthetic nodules are the anomaly.

    python -m adcore.data.demo_chest --output /tmp/chest_demo --seed 0
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from adcore.data.bmad import write_domain
from adcore.data.demo import LESIONS_FILE, SPLIT_IDS, DemoOutput, rand_deform, reuse_or_clear, write_split
from adcore.data.imageops import resize
from adcore.data.synth import lesion_mask

DEMO_VERSION = 2  # bump when the generator changes so existing folders are regenerated
MODALITY = "chest_xr"
DOMAIN = "chest_xray"  # dataset.json: the prompts of models that use text
LESION_KIND = "pulmonary_nodule"
_SOURCE_FILE = "RG1_UNCI.dcm"  # pydicom-data: PA chest computed radiograph
_WORK_SIDE = 512  # lung segmentation runs at this resolution (fast; the lungs are ~150 px wide)
_WINDOW_PCT = (0.5, 99.5)  # display window from the pixel percentiles (the DICOM window clips the lungs)


@dataclass
class NoduleConfig:
    """Ranges of the synthetic pulmonary nodule (sampled uniformly)."""

    area_frac: tuple = (0.02, 0.06)  # nodule area / lung-field area: about 8-15 px radius at 224 px
    irregularity: tuple = (0.05, 0.2)  # nodules are round, well circumscribed
    # Peak brightening towards white at the nodule's centre. Version 1's 0.15-0.35 left nodules 0.02-0.12
    # above the tissue around them, below the normal images' own variation (PatchCore at chance).
    opacity: tuple = (0.4, 0.7)
    texture_amp: tuple = (0.0, 0.1)  # internal heterogeneity, relative to the opacity


_NODULE = NoduleConfig()


@dataclass
class ChestDemoConfig:
    """What a chest demo folder was made with; recorded in ``demo.json``."""

    n_train: int = 200
    n_valid: int = 40  # half normal, half anomalous
    n_test: int = 100  # half normal, half anomalous
    size: int = 224
    seed: int = 0


def _load_radiograph() -> np.ndarray:
    """The source radiograph as float32 in [0, 1], bone and soft tissue bright (display convention)."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(_SOURCE_FILE)
    if path is None:
        raise FileNotFoundError(f"{_SOURCE_FILE} not found: install pydicom-data (offline test files)")
    ds = pydicom.dcmread(path)
    a = ds.pixel_array.astype(np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # low values are white
        a = a.max() - a
    lo, hi = np.percentile(a, _WINDOW_PCT)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def lung_fields(image: np.ndarray) -> np.ndarray:
    """Conservative lung-field mask of a PA radiograph: the two largest dark regions inside the body.

    Thresholds the smoothed image at the 30th percentile of the body, opens away the narrow bridges
    (rib gaps, apices above the clavicles), keeps the two largest components and closes each one
    so vessels and opacities inside it belong to the lung.
    """
    g = ndimage.gaussian_filter(image, 6)
    body = ndimage.binary_erosion(ndimage.gaussian_filter(image, 2) > 0.25, iterations=12)
    dark = ndimage.binary_opening((g < np.percentile(g[body], 30)) & body, iterations=10)
    labels, n = ndimage.label(dark)
    if n < 2:
        raise ValueError(f"lung segmentation found {n} lung field(s), expected 2")
    sizes = ndimage.sum(dark, labels, range(1, n + 1))
    out = np.zeros_like(dark)
    cross = ndimage.generate_binary_structure(2, 1)
    for k in np.argsort(sizes)[::-1][:2] + 1:
        pad = 30  # room for the closing at the image border
        closed = ndimage.binary_closing(np.pad(labels == k, pad), structure=cross, iterations=25)
        out |= ndimage.binary_fill_holes(closed[pad:-pad, pad:-pad])
    return out & body


@lru_cache(maxsize=4)
def _base(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square field of view of the radiograph at ``size`` and its lung fields (bool)."""
    full = _load_radiograph()
    h, w = full.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2  # centred square: apices to diaphragm
    square = full[top : top + side, left : left + side]
    work = resize(square, (_WORK_SIDE, _WORK_SIDE))
    lungs = lung_fields(work)
    image = np.clip(resize(square, (size, size)), 0, 1)
    lungs = resize(lungs.astype(np.float32), (size, size)) > 0.5
    return image.astype(np.float32), lungs


def rand_exposure(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Exposure/contrast, heel-effect gradient, detector blur and quantum noise."""
    n = image.shape[0]
    out = image ** rng.uniform(0.8, 1.25)  # processing curve / kVp: contrast of ribs against lung
    out = out * rng.uniform(0.9, 1.1) + rng.uniform(-0.04, 0.04)
    theta = rng.uniform(0, 2 * np.pi)  # anode-heel effect: a linear ramp in a random direction
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n - 0.5
    out = out * (1 + rng.uniform(0.0, 0.08) * (np.cos(theta) * yy + np.sin(theta) * xx))
    out = ndimage.gaussian_filter(out, rng.uniform(0.0, 0.8))  # detector / scatter unsharpness
    sigma = rng.uniform(0.004, 0.02)
    # fewer photons reach the detector behind dense tissue: relatively more noise where bright
    out = out + sigma * np.sqrt(0.25 + np.clip(out, 0, 1)) * rng.standard_normal(out.shape)
    return np.clip(out, 0, 1).astype(np.float32)


def paint_nodule(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, cfg: NoduleConfig = _NODULE):
    """Adds a nodule on ``mask``: brightening proportional to a sphere's projected thickness.

    For a sphere of radius r, the chord at depth d from its rim is ``2 sqrt(d (2r - d))``; with r the
    mask's largest depth the profile is 0 at the rim, 1 at the centre and rises steeply, so the edge
    is well defined. Pixels outside ``mask`` are unchanged.
    """
    depth = ndimage.distance_transform_edt(mask)
    r = max(float(depth.max()), 1.0)
    thickness = np.sqrt(np.clip(depth * (2 * r - depth), 0, None)) / r  # [H, W] in [0, 1]
    grain = ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), max(r / 4, 1.0))
    grain /= max(float(grain.std()), 1e-6)
    amount = rng.uniform(*cfg.opacity) * thickness * (1 + rng.uniform(*cfg.texture_amp) * grain)
    out = image + np.clip(amount, 0, 1) * (1 - image)  # towards white; never past it
    return np.where(mask, out, image).astype(np.float32)


def make_sample(rng: np.random.Generator, size: int = 224, anomalous: bool = False):
    """One radiograph and, when anomalous, its nodule mask (else None)."""
    base, lungs = _base(size)
    image, lungs = rand_deform(rng, base, lungs)
    mask = None
    if anomalous:
        mask, _, _ = lesion_mask(rng, lungs, _NODULE.area_frac, _NODULE.irregularity)
        image = paint_nodule(rng, image, mask)
    return rand_exposure(rng, image), mask


def _sample(size: int):
    def sample(rng, j):
        return (*make_sample(rng, size, j is not None), LESION_KIND)

    return sample


def make_chest_dataset(
    root, *, n_train: int = 200, n_valid: int = 40, n_test: int = 100, size: int = 224, seed: int = 0
) -> Path:
    """Writes the chest demo under ``root`` (BMAD layout) and returns ``root``.

    Idempotent as :func:`adcore.data.demo.make_demo_dataset`: the same config writes nothing, another
    config rebuilds the folder, split folders without ``demo.json`` are refused.
    """
    root = Path(root)
    cfg = ChestDemoConfig(n_train, n_valid, n_test, size, seed)
    record = {"version": DEMO_VERSION, "modality": MODALITY, "lesion": LESION_KIND, **asdict(cfg)}
    meta = root / "demo.json"
    if reuse_or_clear(root, meta, record, SPLIT_IDS):
        write_domain(root, DOMAIN)
        return root
    kinds: dict[str, str] = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        write_split(root, split, n, cfg.seed, _sample(cfg.size), kinds)
    (root / LESIONS_FILE).write_text(json.dumps(kinds, indent=1, sort_keys=True))
    write_domain(root, DOMAIN)
    meta.write_text(json.dumps(record, indent=1))  # last: a half-written folder is redone
    return root


def main(argv=None) -> None:
    from adcore.cli import parse_configs

    where, cfg = parse_configs(
        (DemoOutput, ChestDemoConfig), argv, __doc__.split("\n")[0], prog="python -m adcore.data.demo_chest"
    )
    root = make_chest_dataset(where.output, **asdict(cfg))
    print(f"chest demo dataset in {root}")


if __name__ == "__main__":
    main()

"""The evaluation suite: five small datasets from different real images, each with its own lesion kinds.

Benchmarks only (``bench/quality.py --suite all``); training code never imports this package. Each
dataset is a BMAD-layout folder (``adcore.data.bmad``) made from one real image shipped offline, with
normal images drawn as geometric and acquisition variations of it (:mod:`.normals`) and anomalous ones
carrying one lesion of a dataset-specific kind (:mod:`.lesions`): at least one clearly visible kind and
one faint kind per dataset. ``dataset.json`` records the imaging domain (read by training to choose the
text prompts) and the kinds; ``lesions.json`` the kind of every anomalous image.

    python -m adcore.data.suite --name head_ct --output /tmp/head_ct --n-train 150
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from adcore.data.bmad import DATASET_FILE
from adcore.data.demo import LESIONS_FILE, SPLIT_IDS, reuse_or_clear, write_split
from adcore.data.suite.lesions import LesionKind, paint
from adcore.data.suite.normals import SOURCES

SUITE_VERSION = 1  # bump when a generator changes so existing folders are regenerated


@dataclass(frozen=True)
class SuiteDataset:
    source: str  # key of normals.SOURCES
    domain: str  # imaging domain (adcore/prompts/<domain>.json), recorded in dataset.json
    kinds: dict[str, LesionKind]


_DARK_RED = (0.5, 1.0, 1.0)  # a darkening mostly of green and blue: blood on a fundus photo
_YELLOW = (1.0, 1.0, 0.2)  # exudates brighten red and green
_HAEMATOXYLIN = (1.0, 0.9, 0.5)  # dense nuclei darken red and green more than blue

SUITE: dict[str, SuiteDataset] = {
    "brain": SuiteDataset("brain", "brain_mri", {
        "hypointense_lesion": LesionKind((-0.45, -0.25), area_frac=(0.02, 0.08)),
        "faint_hyperintensity": LesionKind((0.05, 0.1), area_frac=(0.04, 0.12), edge_frac=(0.3, 0.6)),
    }),
    "chest": SuiteDataset("chest", "chest_xray", {
        "nodule": LesionKind((0.25, 0.45), area_frac=(0.01, 0.04), irregularity=(0.05, 0.2)),
        "faint_opacity": LesionKind((0.05, 0.1), area_frac=(0.04, 0.12), edge_frac=(0.3, 0.6)),
    }),
    "head_ct": SuiteDataset("head_ct", "head_ct", {
        "haemorrhage": LesionKind((0.3, 0.5), area_frac=(0.01, 0.05)),
        "faint_hypodensity": LesionKind((-0.1, -0.05), area_frac=(0.04, 0.12), edge_frac=(0.3, 0.6)),
    }),
    "retina": SuiteDataset("retina", "retinal_fundus", {
        "haemorrhages": LesionKind((-0.4, -0.25), area_frac=(0.002, 0.006), colour=_DARK_RED, n_foci=3),
        "faint_exudate": LesionKind((0.05, 0.1), area_frac=(0.01, 0.04), colour=_YELLOW),
    }),
    "pathology": SuiteDataset("pathology", "histopathology", {
        "dense_infiltrate": LesionKind((-0.4, -0.25), area_frac=(0.03, 0.1), colour=_HAEMATOXYLIN, texture=0.4),
        "faint_pallor": LesionKind((0.05, 0.1), area_frac=(0.05, 0.15), edge_frac=(0.3, 0.6)),
    }),
}  # fmt: skip


@dataclass
class SuiteConfig:
    """What a suite folder was made with; recorded in ``dataset.json``."""

    n_train: int = 150
    n_valid: int = 40  # half normal, half anomalous (kinds in turn)
    n_test: int = 100  # half normal, half anomalous (kinds in turn)
    size: int = 128
    seed: int = 0


def make_sample(name: str, rng: np.random.Generator, size: int, kind: str | None = None):
    """One image of dataset ``name`` and its lesion mask (None when ``kind`` is None: a normal image)."""
    spec = SUITE[name]
    source = SOURCES[spec.source]
    image, fg = source.normal(rng, size)
    mask = None
    if kind is not None:
        image, mask = paint(rng, image, fg, spec.kinds[kind])
    return source.acquire(rng, image), mask


def _sampler(name: str, size: int):
    names = list(SUITE[name].kinds)

    def sample(rng, j):
        kind = None if j is None else names[j % len(names)]
        return (*make_sample(name, rng, size, kind), kind)

    return sample


def make_suite_dataset(name: str, root, **sizes) -> Path:
    """Writes dataset ``name`` under ``root`` (BMAD layout) and returns ``root``.

    Idempotent: when ``dataset.json`` records the same config nothing is written; another config
    rebuilds the folder; split folders without ``dataset.json`` are refused.
    """
    if name not in SUITE:
        raise ValueError(f"no suite dataset {name!r}; known: {sorted(SUITE)}")
    root, cfg, spec = Path(root), SuiteConfig(**sizes), SUITE[name]
    faint = {k: ("faint" if v.faint else "visible") for k, v in spec.kinds.items()}
    record = {"suite": name, "version": SUITE_VERSION, "domain": spec.domain, "kinds": faint, **asdict(cfg)}
    meta = root / DATASET_FILE
    if reuse_or_clear(root, meta, record, SPLIT_IDS):
        return root
    kinds: dict[str, str] = {}
    for split in SPLIT_IDS:
        write_split(root, split, getattr(cfg, f"n_{split}"), cfg.seed, _sampler(name, cfg.size), kinds)
    (root / LESIONS_FILE).write_text(json.dumps(kinds, indent=1, sort_keys=True))
    meta.write_text(json.dumps(record, indent=1))  # last: a half-written folder is redone
    return root


@dataclass
class SuiteOutput:
    name: str  # one of SUITE
    output: str  # folder to write


def main(argv=None) -> None:
    from adcore.cli import parse_configs

    where, cfg = parse_configs(
        (SuiteOutput, SuiteConfig), argv, __doc__.split("\n")[0], prog="python -m adcore.data.suite"
    )
    print(f"{where.name} in {make_suite_dataset(where.name, where.output, **asdict(cfg))}")


if __name__ == "__main__":
    main()

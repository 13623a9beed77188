"""Anomaly categories: the demo's categories.csv, the BMAD reader's convention, stratified labelled draws."""

import json

import numpy as np
import pytest
from scipy import ndimage

from adcore.data import bmad
from adcore.data.demo import lesion_kinds, make_demo_dataset
from adcore.data.errors import DatasetLayoutError

KINDS = ["hyperintense_mass", "hypointense_cyst", "diffuse_region", "calcified_foci"]
SMALL = dict(n_train=4, n_valid=8, n_test=8, size=96)


@pytest.fixture(scope="module")
def cats(tmp_path_factory):
    root = tmp_path_factory.mktemp("cats") / "d"
    return make_demo_dataset(root, seed=2, kinds=KINDS, n_train_anomalous=8, categories=True, **SMALL)


def test_demo_writes_categories_csv_from_the_kinds(cats):
    rows = (cats / bmad.CATEGORIES_FILE).read_text().splitlines()
    assert rows[0] == "path,category" and len(rows) == 1 + 4 + 4 + 8
    assert bmad.read_categories(cats) == lesion_kinds(cats)
    assert bmad.list_categories(cats) == sorted(KINDS)
    assert json.loads((cats / "demo.json").read_text())["categories"] is True


def test_reader_puts_categories_on_anomalous_samples_only(cats):
    test = bmad.list_split(cats, "test")
    assert [s.category for s in test if s.label == 0] == [None] * 4
    assert [s.category for s in test if s.label == 1] == KINDS  # kinds in turn, as lesions.json says


def test_labelled_draw_is_stratified_by_category(cats):
    for k in (1, 2):
        few = [s for s in bmad.list_split(cats, "train", labelled=k * 4, seed=5) if s.label == 1]
        assert sorted(s.category for s in few) == sorted(KINDS * k)
        again = [s.path for s in bmad.list_split(cats, "train", labelled=k * 4, seed=5) if s.label == 1]
        assert again == [s.path for s in few]  # seeded
    five = [s.category for s in bmad.list_split(cats, "train", labelled=5, seed=0) if s.label == 1]
    assert sorted(five) == sorted(KINDS + ["calcified_foci"])  # remainder to the first category (sorted)


def test_a_category_with_too_few_images_is_refused(cats, tmp_path):
    import shutil

    root = shutil.copytree(cats, tmp_path / "short")
    kinds = bmad.read_categories(root)
    foci = sorted(p for p, k in kinds.items() if p.startswith("train/") and k == "calcified_foci")
    bmad.write_categories(root, {**kinds, foci[0]: "diffuse_region"})  # one calcified_foci image left
    with pytest.raises(DatasetLayoutError, match="2 labelled anomalies of category 'calcified_foci'"):
        bmad.list_split(root, "train", labelled=8, seed=0)


def test_without_categories_the_draw_is_unchanged(tmp_path):
    root = make_demo_dataset(tmp_path / "p", seed=2, kinds=KINDS, n_train_anomalous=6, **SMALL)
    assert not (root / bmad.CATEGORIES_FILE).exists() and bmad.list_categories(root) == []
    few = [s for s in bmad.list_split(root, "train", labelled=3, seed=4) if s.label == 1]
    bad = sorted((root / "train" / "Ungood" / "img").iterdir())
    want = sorted(np.random.default_rng(4).choice(len(bad), 3, replace=False).tolist())  # the draw before categories
    assert [s.path for s in few] == [bad[i] for i in want] and all(s.category is None for s in few)


def test_categories_csv_is_checked_and_needs_kinds(tmp_path):
    with pytest.raises(ValueError, match="needs lesion kinds"):
        make_demo_dataset(tmp_path / "x", categories=True, **SMALL)
    (tmp_path / bmad.CATEGORIES_FILE).write_text("file,kind\na.png,cyst\n")
    with pytest.raises(DatasetLayoutError, match="path,category"):
        bmad.read_categories(tmp_path)


def test_calcified_foci_are_several_small_bright_spots(cats):
    test = bmad.list_split(cats, "test")
    sample = next(s for s in test if s.category == "calcified_foci")
    image, mask = bmad.load_sample(sample)
    _, n = ndimage.label(mask)
    assert n >= 3 and mask.mean() < 0.05
    gray = image if image.ndim == 2 else image.mean(-1)
    assert gray[mask].mean() > np.percentile(gray[gray > 0.05], 90)  # brighter than nearly all tissue

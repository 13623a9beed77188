"""BMAD layout reader on small trees written in tmp folders."""

import numpy as np
import pytest

from adcore.data.bmad import Sample, has_masks, list_split, load_sample
from adcore.data.errors import DatasetLayoutError
from adcore.data.imageops import save_mask_png, save_png

SIZE = (16, 20)


def _img(folder, name, value=0.5):
    save_png(folder / name, np.full(SIZE, value, np.float32))


def _mask(folder, name, seed):
    m = np.zeros(SIZE, bool)
    m[seed : seed + 4, 2:9] = True
    save_mask_png(folder / name, m)
    return m


def make_tree(root, mask_dir="label", img_sub=True, masks=True):
    sub = "img" if img_sub else ""
    for i in range(3):
        _img(root / "train" / "good" / sub, f"t{i}.png")
    truth = {}
    for split in ("valid", "test"):
        for i in (1, 0):  # written out of order: listing must sort
            _img(root / split / "good" / sub, f"g{i}.png", 0.2)
            _img(root / split / "Ungood" / sub, f"u{i}.png", 0.8)
            if masks:
                truth[(split, f"u{i}.png")] = _mask(root / split / "Ungood" / mask_dir, f"u{i}.png", i + 2)
    return truth


@pytest.mark.parametrize("mask_dir", ["label", "anomaly_mask"])
@pytest.mark.parametrize("img_sub", [True, False])
def test_both_mask_conventions(tmp_path, mask_dir, img_sub):
    truth = make_tree(tmp_path, mask_dir, img_sub)
    train = list_split(tmp_path, "train")
    assert [s.path.name for s in train] == ["t0.png", "t1.png", "t2.png"]
    assert all(s.label == 0 and s.mask_path is None for s in train) and not has_masks(train)
    for split in ("valid", "test"):
        samples = list_split(tmp_path, split)
        assert [(s.path.name, s.label) for s in samples] == [("g0.png", 0), ("g1.png", 0), ("u0.png", 1), ("u1.png", 1)]
        assert has_masks(samples)
        assert samples == list_split(tmp_path, split)  # deterministic
        for s in samples:
            image, mask = load_sample(s)
            assert image.shape == SIZE and image.dtype == np.float32
            assert mask.shape == SIZE and mask.dtype == bool
            if s.label:
                assert s.mask_path.parent.name == mask_dir and s.mask_path.name == s.path.name
                np.testing.assert_array_equal(mask, truth[(split, s.path.name)])
            else:
                assert not mask.any()


def test_classification_only(tmp_path):
    make_tree(tmp_path, img_sub=False, masks=False)
    samples = list_split(tmp_path, "test")
    assert not has_masks(samples)
    assert [load_sample(s)[1] for s in samples] == [None] * 4


def test_missing_split_and_empty_folders(tmp_path):
    with pytest.raises(DatasetLayoutError, match=str(tmp_path / "valid")):
        list_split(tmp_path, "valid")
    (tmp_path / "train" / "good" / "img").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="good"):
        list_split(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        list_split(tmp_path, "training")


def test_missing_ungood_or_mask(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "test" / "Ungood" / "label" / "u1.png").unlink()
    with pytest.raises(DatasetLayoutError, match="u1.png"):
        list_split(tmp_path, "test")
    _img(tmp_path / "other" / "good" / "img", "g.png")
    for p in (tmp_path / "valid" / "Ungood").rglob("*.png"):
        p.unlink()
    with pytest.raises(DatasetLayoutError, match="Ungood"):
        list_split(tmp_path, "valid")


def test_mask_shape_mismatch(tmp_path):
    _img(tmp_path, "a.png")
    save_mask_png(tmp_path / "m.png", np.ones((5, 5), bool))
    with pytest.raises(DatasetLayoutError, match="m.png"):
        load_sample(Sample(tmp_path / "a.png", 1, tmp_path / "m.png", True))

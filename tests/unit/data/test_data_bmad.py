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
    for split in ("valid", "test"):
        for p in (tmp_path / split / "Ungood").rglob("*.png"):
            p.unlink()
    with pytest.raises(DatasetLayoutError, match="Ungood"):
        list_split(tmp_path, "test")  # a test split without anomalies cannot be evaluated
    # A validation split of normal images only is valid (thresholds from a target specificity).
    samples = list_split(tmp_path, "valid")
    assert samples and all(s.label == 0 and s.mask_path is None for s in samples)


def test_mask_shape_mismatch(tmp_path):
    _img(tmp_path, "a.png")
    save_mask_png(tmp_path / "m.png", np.ones((5, 5), bool))
    with pytest.raises(DatasetLayoutError, match="m.png"):
        load_sample(Sample(tmp_path / "a.png", 1, tmp_path / "m.png", True))


def _train_ungood(root, n=4, masks=True):
    truth = {}
    for i in range(n):
        _img(root / "train" / "Ungood" / "img", f"a{i}.png", 0.9)
        if masks:
            truth[f"a{i}.png"] = _mask(root / "train" / "Ungood" / "anomaly_mask", f"a{i}.png", i)
    return truth


def test_labelled_training_anomalies_are_a_seeded_draw(tmp_path):
    make_tree(tmp_path)
    truth = _train_ungood(tmp_path)
    assert [s.label for s in list_split(tmp_path, "train")] == [0, 0, 0], "labelled=0: train/Ungood is not read"
    two = list_split(tmp_path, "train", labelled=2, seed=0)
    assert [s.label for s in two] == [0, 0, 0, 1, 1]
    assert two == list_split(tmp_path, "train", labelled=2, seed=0)
    draws = {tuple(s.path.name for s in list_split(tmp_path, "train", labelled=2, seed=k)[3:]) for k in range(8)}
    assert len(draws) > 1, "the seed picks which anomalies"
    for s in two[3:]:
        image, mask = load_sample(s)
        np.testing.assert_array_equal(mask, truth[s.path.name])
    normal_image, normal_mask = load_sample(two[0])
    assert normal_mask is None  # a training normal's mask stays unknown (the loop fills zeros when needed)
    assert [s.path.name for s in list_split(tmp_path, "train", labelled=4)[3:]] == [
        "a0.png",
        "a1.png",
        "a2.png",
        "a3.png",
    ]


def test_labelled_training_anomalies_masks_optional_and_errors(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(DatasetLayoutError, match="1 labelled anomalies .*found 0"):
        list_split(tmp_path, "train", labelled=1)
    _train_ungood(tmp_path, n=2, masks=False)
    samples = list_split(tmp_path, "train", labelled=2)
    assert [(s.label, s.mask_path) for s in samples[3:]] == [(1, None), (1, None)] and not has_masks(samples)
    with pytest.raises(DatasetLayoutError, match="3 labelled anomalies .*found 2"):
        list_split(tmp_path, "train", labelled=3)
    with pytest.raises(ValueError, match="train split only"):
        list_split(tmp_path, "valid", labelled=1)
    with pytest.raises(ValueError, match=">= 0"):
        list_split(tmp_path, "train", labelled=-1)

"""Demo dataset: determinism, layout, lesions inside the brain, idempotence, CLI."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from adcore.data.bmad import has_masks, list_split, load_sample
from adcore.data.demo import main, make_demo_dataset

SMALL = dict(n_train=4, n_valid=4, n_test=6, size=96)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_same_bytes(tmp_path):
    a = _files(make_demo_dataset(tmp_path / "a", seed=3, **SMALL))
    b = _files(make_demo_dataset(tmp_path / "b", seed=3, **SMALL))
    c = _files(make_demo_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a == b and len(a) == 4 + 4 + 6 + 2 + 3  # images plus Ungood masks
    assert a.keys() == c.keys() and a != c


def test_layout_and_lesions_inside_brain(tmp_path):
    root = make_demo_dataset(tmp_path / "d", seed=1, **SMALL)
    assert len(list_split(root, "train")) == 4
    test = list_split(root, "test")
    assert [s.label for s in test] == [0, 0, 0, 1, 1, 1] and has_masks(test)
    for s in test:
        image, mask = load_sample(s)
        assert image.shape == (96, 96) and mask.shape == (96, 96)
        brain = ndimage.binary_fill_holes(image > 0.08)
        brain = ndimage.binary_dilation(ndimage.binary_opening(brain, iterations=2), iterations=2)
        if s.label == 0:
            assert not mask.any() and brain.mean() > 0.2
            continue
        assert mask.any() and not (mask & ~brain).any()
        assert 0.02 < mask.sum() / brain.sum() < 0.3
        raw = np.asarray(Image.open(s.mask_path))
        assert set(np.unique(raw)) <= {0, 255}


def test_idempotent_and_rebuilt_on_new_config(tmp_path):
    root = make_demo_dataset(tmp_path / "d", **SMALL)
    stamp = (root / "train" / "good" / "img" / "0000.png").stat().st_mtime_ns
    make_demo_dataset(root, **SMALL)
    assert (root / "train" / "good" / "img" / "0000.png").stat().st_mtime_ns == stamp
    make_demo_dataset(root, **{**SMALL, "n_train": 2})
    assert len(list_split(root, "train")) == 2
    assert json.loads((root / "demo.json").read_text())["n_train"] == 2


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileExistsError, match="demo.json"):
        make_demo_dataset(tmp_path, **SMALL)


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--n-train", "2", "--n-valid", "2", "--n-test", "2", "--size", "64"])
    assert "demo dataset in" in capsys.readouterr().out
    assert len(list_split(tmp_path / "cli", "valid")) == 2

"""Chest demo dataset: determinism, layout, nodules inside the lung fields, idempotence, CLI."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from adcore.data.bmad import has_masks, list_split, load_sample
from adcore.data.demo import lesion_kinds, rand_deform
from adcore.data.demo_chest import LESION_KIND, _base, main, make_chest_dataset, paint_nodule

SMALL = dict(n_train=4, n_valid=4, n_test=6, size=96)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_same_bytes(tmp_path):
    a = _files(make_chest_dataset(tmp_path / "a", seed=3, **SMALL))
    b = _files(make_chest_dataset(tmp_path / "b", seed=3, **SMALL))
    c = _files(make_chest_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a == b and len(a) == 4 + 4 + 6 + 2 + 3  # images plus Ungood masks
    assert a.keys() == c.keys() and a != c


def test_lung_fields_are_two_lungs():
    _, lungs = _base(96)
    labels, n = ndimage.label(lungs)
    assert n == 2 and 0.1 < lungs.mean() < 0.4
    centres = sorted(ndimage.center_of_mass(lungs, labels, [1, 2]), key=lambda c: c[1])
    assert centres[0][1] < 48 < centres[1][1], "one lung on each side of the midline"


def test_layout_and_nodules_inside_lungs(tmp_path):
    root = make_chest_dataset(tmp_path / "d", seed=1, **SMALL)
    assert len(list_split(root, "train")) == 4
    test = list_split(root, "test")
    assert [s.label for s in test] == [0, 0, 0, 1, 1, 1] and has_masks(test)
    base, lungs = _base(96)
    for i, s in enumerate(test):
        image, mask = load_sample(s)
        assert image.shape == (96, 96) and mask.shape == (96, 96)
        if s.label == 0:
            assert not mask.any()
            continue
        # the sample's own deformed lung fields: same seed stream as the generator
        _, sample_lungs = rand_deform(np.random.default_rng([1, 2, i]), base, lungs)
        assert mask.any() and not (mask & ~sample_lungs).any()
        assert 0.005 < mask.sum() / sample_lungs.sum() < 0.08
        assert set(np.unique(np.asarray(Image.open(s.mask_path)))) <= {0, 255}
    kinds = lesion_kinds(root)
    assert set(kinds.values()) == {LESION_KIND} and len(kinds) == 2 + 3
    record = json.loads((root / "demo.json").read_text())
    assert record["modality"] == "chest_xr" and record["size"] == 96


def test_paint_nodule_brightens_only_inside_with_peak_at_centre():
    rng = np.random.default_rng(0)
    image = np.full((41, 41), 0.4, np.float32)
    yy, xx = np.mgrid[:41, :41]
    mask = np.hypot(yy - 20, xx - 20) <= 8
    out = paint_nodule(rng, image, mask)
    assert np.array_equal(out[~mask], image[~mask])
    assert (out[mask] >= image[mask]).all() and out.max() <= 1.0
    assert out[20, 20] > out[20, 27] > image[20, 27], "projected thickness peaks at the centre"


def test_idempotent_and_rebuilt_on_new_config(tmp_path):
    root = make_chest_dataset(tmp_path / "d", **SMALL)
    first = root / "train" / "good" / "img" / "0000.png"
    stamp = first.stat().st_mtime_ns
    make_chest_dataset(root, **SMALL)
    assert first.stat().st_mtime_ns == stamp
    make_chest_dataset(root, **{**SMALL, "n_train": 2})
    assert len(list_split(root, "train")) == 2
    (tmp_path / "foreign" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="demo.json"):
        make_chest_dataset(tmp_path / "foreign", **SMALL)


def test_cli(tmp_path, capsys):
    main(["--output", str(tmp_path / "cli"), "--n-train", "2", "--n-valid", "2", "--n-test", "2", "--size", "64"])
    assert "chest demo dataset in" in capsys.readouterr().out
    assert len(list_split(tmp_path / "cli", "valid")) == 2

"""Demo dataset: determinism, layout, lesions inside the brain, idempotence, CLI."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from adcore.data.bmad import has_masks, list_split, load_sample
from adcore.data.demo import lesion_kinds, main, make_demo_dataset

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
    main(["--output", str(tmp_path / "cli"), "--n-train", "2", "--n-valid", "2", "--n-test", "2", "--size", "64"])
    assert "demo dataset in" in capsys.readouterr().out
    assert len(list_split(tmp_path / "cli", "valid")) == 2


KINDS = ["hyperintense_mass", "hypointense_cyst", "diffuse_region"]


def test_default_folder_has_no_kind_record(tmp_path):
    root = make_demo_dataset(tmp_path / "d", **SMALL)
    assert not (root / "lesions.json").exists() and not (root / "train" / "Ungood").exists()
    assert set(json.loads((root / "demo.json").read_text())) == {
        "version",
        "n_train",
        "n_valid",
        "n_test",
        "size",
        "seed",
    }


def test_lesion_kinds_recorded_per_image_and_train_ungood(tmp_path):
    root = make_demo_dataset(tmp_path / "k", seed=1, kinds=KINDS, n_train_anomalous=4, **SMALL)
    plain = make_demo_dataset(tmp_path / "p", seed=1, **SMALL)
    kinds = lesion_kinds(root)
    anomalous = [s for split in ("valid", "test") for s in list_split(root, split) if s.label]
    train = list_split(root, "train", labelled=4)
    anomalous += [s for s in train if s.label]
    assert sorted(kinds) == sorted(str(s.path.relative_to(root)) for s in anomalous)
    assert [kinds[f"test/Ungood/img/{i:04d}.png"] for i in (3, 4, 5)] == KINDS  # kinds in turn
    assert [kinds[f"train/Ungood/img/{i:04d}.png"] for i in range(4)] == KINDS + KINDS[:1]
    for s in train[-4:]:
        image, mask = load_sample(s)
        assert s.mask_path.parent.name == "anomaly_mask" and mask.any() and image.shape == (96, 96)
    for s in list_split(root, "test"):  # normal images are the default folder's, byte for byte
        twin = plain / s.path.relative_to(root)
        assert (s.path.read_bytes() == twin.read_bytes()) == (s.label == 0)
    cyst, mass = (load_sample(s) for s in list_split(root, "test")[4:2:-1])
    assert cyst[0][cyst[1]].mean() < mass[0][mass[1]].mean(), "a cyst is darker than a hyperintense mass"
    with pytest.raises(ValueError, match="unknown lesion kinds"):
        make_demo_dataset(tmp_path / "x", kinds=["glioma"], **SMALL)
    with pytest.raises(FileNotFoundError, match="lesions.json"):
        lesion_kinds(plain)


def test_cli_kinds(tmp_path):
    args = ["--output", str(tmp_path / "c"), "--n-train", "2", "--n-valid", "2", "--n-test", "2", "--size", "64"]
    main(args + ["--kinds", "hypointense_cyst", "--n-train-anomalous", "1"])
    assert set(lesion_kinds(tmp_path / "c").values()) == {"hypointense_cyst"}

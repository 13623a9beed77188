"""The BMAD runner (bench/bmad.py) on a tiny fake BMAD tree in BMAD's released folder layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adcore.data.imageops import save_mask_png, save_png

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import bmad_layout  # noqa: E402

SIZE = 40


def _image(rng: np.random.Generator, anomalous: bool) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    image = 0.4 + 0.1 * np.sin(8 * xx + rng.random()) * np.cos(6 * yy) + 0.03 * rng.random((SIZE, SIZE))
    mask = np.zeros((SIZE, SIZE), bool)
    if anomalous:
        cy, cx = rng.integers(10, 30, 2)
        mask = (np.mgrid[:SIZE, :SIZE][0] - cy) ** 2 + (np.mgrid[:SIZE, :SIZE][1] - cx) ** 2 < 36
        image = np.where(mask, 0.95, image)
    return image.astype(np.float32), mask


def fake_bmad(root: Path) -> Path:
    """Brain_AD (valid|test/{good,Ungood}/{img,label}), Liver_AD ({img,label}/{good,Ungood}) and
    Chest_AD (val|test/{good,Ungood}, no masks), a few generated images each."""
    rng = np.random.default_rng(0)

    def write(folder: Path, n: int, anomalous: bool, mask_folder: Path | None = None) -> None:
        for i in range(n):
            image, mask = _image(rng, anomalous)
            save_png(folder / f"{i:03d}.png", image)
            if mask_folder is not None:
                save_mask_png(mask_folder / f"{i:03d}.png", mask)

    brain = root / "Brain_AD" / "BraTS2021_slice"
    write(brain / "train" / "good", 6, False)
    for split, n in (("valid", 4), ("test", 4)):
        write(brain / split / "good" / "img", n, False)
        write(brain / split / "Ungood" / "img", n, True, brain / split / "Ungood" / "label")
    liver = root / "Liver_AD" / "hist_DIY"
    write(liver / "train" / "good", 3, False)
    for split in ("valid", "test"):
        write(liver / split / "img" / "good", 2, False)
        write(liver / split / "img" / "Ungood", 2, True, liver / split / "label" / "Ungood")
    chest = root / "Chest_AD" / "Chest-RSNA"
    write(chest / "train" / "good", 3, False)
    for split in ("val", "test"):
        write(chest / split / "good", 2, False)
        write(chest / split / "Ungood", 2, True)
    return root


def test_layouts_of_the_released_folders_are_read_and_viewed(tmp_path):
    root = fake_bmad(tmp_path / "BMAD")
    liver = bmad_layout.read_layout(bmad_layout.find_dataset(root, "liver"))
    assert len(liver["valid"].anomalous) == 2 and len(liver["valid"].masks) == 2 and len(liver["train"].normal) == 3
    chest = bmad_layout.read_layout(bmad_layout.find_dataset(root, "rsna"))
    assert len(chest["valid"].normal) == 2 and len(chest["test"].anomalous) == 2 and not chest["test"].masks
    view = bmad_layout.write_view(liver, tmp_path / "view", 32)
    from adcore.data.bmad import list_split, load_sample

    test = list_split(view, "test")
    assert [s.label for s in test] == [0, 0, 1, 1] and all(s.mask_path for s in test if s.label)
    image, mask = load_sample(test[-1])
    assert image.shape[:2] == (32, 32) and mask.shape == (32, 32) and mask.any()
    with pytest.raises(Exception, match="BMAD's oct2017 folder"):
        bmad_layout.find_dataset(root, "oct2017")


@pytest.mark.slow
def test_runner_on_a_fake_bmad_tree(tmp_path):
    root = fake_bmad(tmp_path / "BMAD")
    work = tmp_path / "work"
    cmd = [sys.executable, str(REPO / "bench" / "bmad.py"), "--root", str(root), "--dataset", "brats",
           "--setting", "fewshot-2", "--preset", "patchcore", "--seeds", "1", "--image-size", "32",
           "--tiny", "--smoke-test", "--work", str(work)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| adcore patchcore (1 seeds) | fewshot-2 |" in done.stdout
    assert "| PatchCore (fusion paper's table) | full | 0.9165 | 0.9697 |" in done.stdout
    result = json.loads((work / "brats-fewshot-2-patchcore.json").read_text())
    (run,) = result["runs"]
    assert 0 <= run["image_auroc"] <= 1 and 0 <= run["pixel_auroc"] <= 1
    # the few-shot view: 2 normal training images, 2 validation anomalies moved to training, test untouched
    view = work / "views" / "brats-fewshot-2-patchcore-seed0"
    assert len(list((view / "train" / "good" / "img").iterdir())) == 2
    assert len(list((view / "train" / "Ungood" / "img").iterdir())) == 2
    assert len(list((view / "train" / "Ungood" / "anomaly_mask").iterdir())) == 2
    assert len(list((view / "valid" / "Ungood" / "img").iterdir())) == 2
    assert len(list((view / "test" / "Ungood" / "img").iterdir())) == 4
    config = json.loads((work / "models" / "brats-fewshot-2-patchcore-seed0" / "config.json").read_text())
    assert config["training"]["config"]["labelled"] == 2

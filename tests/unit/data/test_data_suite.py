"""Evaluation-suite datasets: labels, masks and kinds agree; lesions change only masked pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adcore.data.bmad import DATASET_FILE, has_masks, list_split, load_sample, read_domain
from adcore.data.demo import lesion_kinds
from adcore.data.suite import SUITE, make_suite_dataset
from adcore.data.suite.lesions import paint
from adcore.data.suite.normals import SOURCES
from adcore.prompts import list_domains

TINY = dict(n_train=2, n_valid=4, n_test=4, size=64)


def test_five_datasets_each_with_a_faint_and_a_visible_kind():
    assert len({spec.source for spec in SUITE.values()}) >= 5
    for spec in SUITE.values():
        assert spec.domain in list_domains()
        faint = [k.faint for k in spec.kinds.values()]
        assert any(faint) and not all(faint)


@pytest.mark.parametrize("name", list(SUITE))
def test_tiny_dataset_labels_masks_and_kinds_agree(tmp_path, name):
    root = make_suite_dataset(name, tmp_path / name, seed=1, **TINY)
    kinds = lesion_kinds(root)
    assert read_domain(root) == SUITE[name].domain
    assert len(list_split(root, "train")) == 2 and all(s.label == 0 for s in list_split(root, "train"))
    for split in ("valid", "test"):
        samples = list_split(root, split)
        assert [s.label for s in samples].count(1) == 2 and has_masks(samples)
        for s in samples:
            image, mask = load_sample(s)
            assert image.shape[:2] == (64, 64) and image.min() >= 0 and image.max() <= 1
            rel = s.path.relative_to(root).as_posix()
            if s.label:
                assert mask is not None and mask.any() and kinds[rel] in SUITE[name].kinds
            else:
                assert (mask is None or not mask.any()) and rel not in kinds
        assert {kinds[s.path.relative_to(root).as_posix()] for s in samples if s.label} == set(SUITE[name].kinds)
    stamp = (root / DATASET_FILE).stat().st_mtime_ns
    make_suite_dataset(name, root, seed=1, **TINY)  # same config: nothing rewritten
    assert (root / DATASET_FILE).stat().st_mtime_ns == stamp
    assert json.loads((root / DATASET_FILE).read_text())["kinds"] == {
        k: "faint" if v.faint else "visible" for k, v in SUITE[name].kinds.items()
    }


@pytest.mark.parametrize("name", list(SUITE))
def test_lesions_stay_in_their_mask_and_faint_ones_are_fainter(name):
    spec, source = SUITE[name], SOURCES[SUITE[name].source]
    contrast = {}
    for kind_name, kind in spec.kinds.items():
        shifts = []
        for i in range(3):
            rng = np.random.default_rng([7, i])
            image, fg = source.normal(rng, 96)
            out, mask = paint(rng, image, fg, kind)
            diff = np.abs(out - image)
            diff = diff.max(-1) if diff.ndim == 3 else diff
            assert mask.any() and (mask <= fg).all()
            assert not diff[~mask].any()  # nothing outside the mask changes
            shifts.append(float(diff[mask].mean()))
        contrast[kind_name] = (kind.faint, float(np.mean(shifts)))
    faint = max(c for f, c in contrast.values() if f)
    visible = min(c for f, c in contrast.values() if not f)
    assert 0 < faint < visible, contrast

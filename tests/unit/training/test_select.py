"""Choices made on the validation split: a prior choice is kept unless another beats it by more than noise."""

from __future__ import annotations

import numpy as np
import pytest

from adcore.training.select import _best, auroc_standard_error


def test_standard_error_matches_hanley_mcneil():
    # by hand: Q1 = 0.9 / 1.1, Q2 = 1.62 / 1.9; (0.09 + 49 (Q1 - 0.81) + 49 (Q2 - 0.81)) / 2500 -> SE 0.0321
    assert auroc_standard_error(0.9, 50, 50) == pytest.approx(0.0321, abs=2e-4)
    assert auroc_standard_error(0.9, 10, 10) > auroc_standard_error(0.9, 100, 100)  # fewer images, more noise


def _table(means):
    return [{"choice": {"w": i}, "image_auroc": m, "mean": m} for i, m in enumerate(means)]


def test_prior_kept_unless_clearly_beaten():
    labels = np.array([0] * 10 + [1] * 10)
    margin = auroc_standard_error(0.8, 10, 10)
    assert _best(_table([0.8, 0.8 + 0.5 * margin]), 0, labels) == (0, margin)  # within noise: the prior
    assert _best(_table([0.8, 0.8 + 2 * margin]), 0, labels)[0] == 1  # clearly better: taken
    assert _best(_table([0.7, 0.8]), None, labels) == (1, 0.0)  # no prior: the best
    many = np.array([0] * 500 + [1] * 500)  # a large split: a small gain is enough
    assert _best(_table([0.8, 0.8 + 0.5 * margin]), 0, many)[0] == 1

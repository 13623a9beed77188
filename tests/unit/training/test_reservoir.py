"""A head's fit keeps a bounded sample of its patches: every one while they fit, a uniform sample beyond."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from adcore.layers.coreset import greedy_coreset
from adcore.models import create
from adcore.models.patchcore.fit import fit_memory_bank
from adcore.training.data import SyntheticAnomalyBatches
from adcore.training.fit import FIT_EPOCH, FitData
from adcore.training.reservoir import Reservoir


def _batches(n_rows: int, batch: int, width: int = 8):
    rows = np.arange(n_rows * width, dtype=np.float32).reshape(n_rows, width)
    return [rows[i : i + batch] for i in range(0, n_rows, batch)]


def test_under_the_cap_every_row_is_kept_in_order():
    parts = _batches(50, 7)
    kept = Reservoir(50, seed=3)
    for part in parts:
        kept.add(part, part[:, 0].astype(np.int64))
    rows, ids = kept.arrays()
    np.testing.assert_array_equal(rows, np.concatenate(parts))
    np.testing.assert_array_equal(ids, rows[:, 0])
    assert kept.seen == 50 and len(kept) == 50


def test_over_the_cap_a_uniform_sample_of_distinct_rows():
    cap, n = 1000, 20_000
    kept = Reservoir(cap, seed=0)
    for part in _batches(n, 64, width=1):
        kept.add(part)
    rows = kept.rows()[:, 0]
    assert len(rows) == cap and kept.seen == n
    assert len(np.unique(rows)) == cap, "a row is kept at most once"
    # Uniform over all rows: each tenth of the input holds about a tenth of the sample (binomial sd ~9.5).
    counts = np.bincount((rows // (n // 10)).astype(int), minlength=10)
    assert counts.min() > 60 and counts.max() < 140, counts


def test_memory_stays_bounded_as_the_input_grows():
    """The reservoir's peak allocation does not grow with the rows offered (beyond the batch itself)."""

    def peak(n_rows: int) -> tuple[int, int]:
        kept = Reservoir(2_000, seed=0)
        tracemalloc.start()
        for _ in range(0, n_rows, 256):
            kept.add(np.ones((256, 64), np.float32))  # a batch's rows, freed after the call
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, len(kept)

    small, big = peak(4_000), peak(64_000)
    assert small[1] == big[1] == 2_000
    assert big[0] <= 1.2 * small[0], f"peak {big[0]} bytes for 16x the rows, {small[0]} for 1x"


def _fit_data(model, n_images: int, max_patches: int) -> FitData:
    rng = np.random.default_rng(0)
    images = [rng.random((model.input_size, model.input_size)).astype(np.float32) for _ in range(n_images)]
    batches = SyntheticAnomalyBatches(images, [None] * n_images, np.zeros(n_images), model.input_size, batch_size=4)
    return FitData(batches, seed=0, max_patches=max_patches)


def _all_normal_patches(model, data) -> np.ndarray:
    with torch.inference_mode():
        parts = [model(b.images).patch_embeddings.float().numpy() for b in data.batches.epoch(FIT_EPOCH, 0.0)]
    return np.concatenate(parts).reshape(-1, parts[0].shape[-1])


@pytest.fixture(scope="module")
def patchcore():
    torch.manual_seed(0)
    return create("patchcore", tiny=True).eval()


def test_fit_under_the_cap_is_the_fit_over_every_patch(patchcore):
    data = _fit_data(patchcore, 6, max_patches=10**6)
    everything = _all_normal_patches(patchcore, data)
    normal, anomalous = data.patches_by_class(patchcore, anomaly_share=0.0)
    np.testing.assert_array_equal(normal, everything)
    assert len(anomalous) == 0
    cfg = patchcore.cfg
    n_select = min(_bank_cap(cfg), max(1, int(len(everything) * cfg.coreset_ratio)))
    expected = everything[greedy_coreset(everything, n_select, seed=0)]
    np.testing.assert_array_equal(fit_memory_bank(patchcore, data).bank, expected)


def _bank_cap(cfg) -> float:
    """The bank's row cap: the configured one, else the CPU's when torch sees no GPU."""
    if cfg.max_bank is not None:
        return cfg.max_bank
    return float("inf") if torch.cuda.is_available() else cfg.cpu_max_bank


def test_fit_keeps_at_most_the_cap_whatever_the_images(patchcore):
    cells = patchcore.grid * patchcore.grid
    cap = 3 * cells  # three images' patches
    for n_images in (4, 12):
        data = _fit_data(patchcore, n_images, max_patches=cap)
        kept, _ = data.patch_reservoirs(patchcore, anomaly_share=0.0)
        assert kept.seen == n_images * cells and len(kept.rows()) == cap
        everything = _all_normal_patches(patchcore, data)
        assert np.isin(kept.rows()[:, 0], everything[:, 0]).all(), "kept rows are patches of the input"
        bank = fit_memory_bank(patchcore, data).bank
        # The bank's size follows every patch seen; its rows come from the sample.
        assert len(bank) == min(_bank_cap(patchcore.cfg), max(1, int(n_images * cells * patchcore.cfg.coreset_ratio)))

"""PatchIndex against NumPy brute force."""

import faiss
import numpy as np
import pytest

from adcore import index as index_mod
from adcore.index import PatchIndex, normalize_rows


def _bank(rng, n=500, e=32):
    return rng.normal(size=(n, e)).astype(np.float64), rng.normal(size=(40, e))


def test_cosine_matches_brute_force(rng):
    bank, queries = _bank(rng)
    idx = PatchIndex(bank, metric="cosine")
    sims, ids = idx.search(queries, k=3)
    ref = normalize_rows(queries) @ normalize_rows(bank).T
    ref_ids = np.argsort(-ref, axis=1)[:, :3]
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, np.take_along_axis(ref, ref_ids, 1), atol=1e-5)
    assert ids.dtype == np.int64 and sims.dtype == np.float32


def test_l2_matches_brute_force(rng):
    bank, queries = _bank(rng)
    idx = PatchIndex(bank, metric="l2")
    dist, ids = idx.search(queries, k=2)
    ref = ((queries[:, None, :] - bank[None]) ** 2).sum(-1)
    ref_ids = np.argsort(ref, axis=1)[:, :2]
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dist, np.take_along_axis(ref, ref_ids, 1), rtol=1e-4)


def test_batched_search_equals_single_call(rng, monkeypatch):
    bank, queries = _bank(rng)
    idx = PatchIndex(bank, metric="l2")
    whole = idx.search(queries, k=1)
    monkeypatch.setattr(index_mod, "QUERY_BATCH", 7)
    parts = idx.search(np.asfortranarray(queries), k=1)  # non-contiguous input too
    np.testing.assert_array_equal(whole[1], parts[1])
    np.testing.assert_allclose(whole[0], parts[0])


def test_device_auto_selection_and_properties(rng):
    bank, _ = _bank(rng, n=10)
    idx = PatchIndex(bank)
    expected = "cuda" if faiss.get_num_gpus() > 0 else "cpu"
    assert idx.device == expected
    assert len(idx) == 10 and idx.vectors.shape == (10, 32)
    np.testing.assert_allclose(np.linalg.norm(idx.vectors, axis=1), 1.0, rtol=1e-5)
    assert PatchIndex(bank, use_gpu=False).device == "cpu"
    if faiss.get_num_gpus() == 0:
        with pytest.raises(RuntimeError, match="no GPU"):
            PatchIndex(bank, use_gpu=True)


def test_errors(rng):
    with pytest.raises(ValueError, match="0 vectors"):
        PatchIndex(np.zeros((0, 8)))
    with pytest.raises(ValueError, match="metric"):
        PatchIndex(np.ones((3, 8)), metric="hamming")
    idx = PatchIndex(rng.normal(size=(5, 8)))
    with pytest.raises(ValueError, match="query dimension 6 does not match index dimension 8"):
        idx.search(np.ones((2, 6)))
    with pytest.raises(ValueError, match="k must be"):
        idx.search(np.ones((2, 8)), k=6)


def test_normalize_rows_zero_row():
    out = normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    assert out.dtype == np.float32 and out.flags.c_contiguous

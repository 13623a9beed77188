from __future__ import annotations

import numpy as np
import pytest

from adcore.heads import CentroidHead, MemoryBankHead, head_from_config, reduce_patches


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_centroid_head_flags_patches_near_anomalous_centroids():
    rng = np.random.default_rng(0)
    normal, anomalous = _unit(rng.standard_normal((16, 8))), _unit(rng.standard_normal((16, 8)))
    head = CentroidHead(np.stack([normal, anomalous]))
    emb = np.stack([normal[:4], anomalous[:4]])[None].reshape(1, 8, 8).astype(np.float32)  # 4 normal, 4 anomalous patches
    few = head.few_shot_map(emb)[0]
    assert (few[4:] > 0.5).all() and (few[:4] < 0.5).all()
    out = {"score": np.zeros(1, np.float32), "anomaly_map": np.zeros((1, 2, 2), np.float32)}
    emb4 = emb[:, :4]
    score, amap = head(out | {"patch_embeddings": emb4})
    assert amap.shape == (1, 2, 2) and np.all(amap <= 0.15 + 1e-6), "alpha_few bounds the few-shot share"


def test_memory_bank_head_is_nearest_neighbour_distance():
    bank = np.eye(4, dtype=np.float32)
    head = MemoryBankHead(bank)
    emb = np.array([[[1, 0, 0, 0], [0, 0, 0, 3]]], np.float32)  # distances 0 and 2
    score, amap = head({"anomaly_map": np.zeros((1, 1, 2)), "score": np.zeros(1), "patch_embeddings": emb})
    np.testing.assert_allclose(amap.ravel(), [0, 2], atol=1e-5)
    assert score[0] == pytest.approx(2, abs=1e-5)
    again = head_from_config(head.config(), head.arrays())
    np.testing.assert_allclose(again({"anomaly_map": np.zeros((1, 1, 2)), "score": np.zeros(1), "patch_embeddings": emb})[1], amap)


def test_reductions():
    x = np.array([[0.0, 1.0, 2.0, 3.0]])
    assert reduce_patches(x, "mean")[0] == 1.5 and reduce_patches(x, "max")[0] == 3
    assert reduce_patches(x, "topk", 0.5)[0] == 2.5
    with pytest.raises(ValueError):
        reduce_patches(x, "median")
    with pytest.raises(ValueError, match="2, K, E"):
        CentroidHead(np.zeros((3, 4, 5), np.float32))

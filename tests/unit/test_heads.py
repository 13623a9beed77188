from __future__ import annotations

import numpy as np
import pytest

from adcore.layers.reduce import reduce_patches
from adcore.models import families
from adcore.models.fusion.head import CentroidHead, CentroidHeadConfig
from adcore.models.patchcore.head import MemoryBankHead


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_centroid_head_blends_few_shot_similarity_with_the_base_model():
    rng = np.random.default_rng(0)
    normal, anomalous = _unit(rng.standard_normal((16, 8))), _unit(rng.standard_normal((16, 8)))
    cfg = CentroidHeadConfig(alpha_few=0.25, temperature=20.0, reduction="mean")
    head = CentroidHead(np.stack([normal, anomalous]), cfg)
    emb = np.concatenate([normal[:2], anomalous[:2]])[None].astype(np.float32)  # [1, 4, 8]: 2 normal, 2 anomalous
    few = head.few_shot_map(emb)[0]
    assert (few[2:] > 0.5).all() and (few[:2] < 0.5).all()
    # By hand: sigmoid(T * (best anomalous cosine - best normal cosine)) per patch.
    sims = emb[0] @ np.concatenate([normal, anomalous]).T  # [4, 32]
    want_few = 1 / (1 + np.exp(-cfg.temperature * (sims[:, 16:].max(1) - sims[:, :16].max(1))))
    np.testing.assert_allclose(few, want_few, atol=1e-5)
    base_map = np.array([[[0.2, 0.4], [0.6, 0.8]]], np.float32)
    base_score = np.array([0.3], np.float32)
    score, amap = head({"score": base_score, "anomaly_map": base_map, "patch_embeddings": emb})
    a = cfg.alpha_few
    np.testing.assert_allclose(amap, (1 - a) * base_map + a * want_few.reshape(1, 2, 2), atol=1e-5)
    assert score[0] == pytest.approx((1 - a) * 0.3 + a * want_few.mean(), abs=1e-5)


def test_memory_bank_head_is_nearest_neighbour_distance():
    bank = np.eye(4, dtype=np.float32)
    head = MemoryBankHead(bank)
    emb = np.array([[[1, 0, 0, 0], [0, 0, 0, 3]]], np.float32)  # distances 0 and 2
    out = {"anomaly_map": np.zeros((1, 1, 2)), "score": np.zeros(1), "patch_embeddings": emb}
    score, amap = head(out)
    np.testing.assert_allclose(amap.ravel(), [0, 2], atol=1e-5)
    assert score[0] == pytest.approx(2, abs=1e-5)


@pytest.mark.parametrize("name", sorted(families()))
def test_every_family_head_round_trips_through_its_saved_form(name):
    head_class = families()[name].head_class
    rng = np.random.default_rng(1)
    emb = _unit(rng.standard_normal((1, 4, 8))).astype(np.float32)
    arrays = {
        "centroids": _unit(rng.standard_normal((2, 3, 8))).astype(np.float32),
        "memory_bank": rng.standard_normal((5, 8)).astype(np.float32),
    }
    head = head_class.from_saved({}, arrays)
    again = head_class.from_saved(head.config(), head.arrays())
    out = {
        "anomaly_map": np.full((1, 2, 2), 0.5, np.float32),
        "score": np.full(1, 0.5, np.float32),
        "patch_embeddings": emb,
    }
    for a, b in zip(head(out), again(out)):
        np.testing.assert_allclose(a, b)


def test_reductions():
    x = np.array([[0.0, 1.0, 2.0, 3.0]])
    assert reduce_patches(x, "mean")[0] == 1.5 and reduce_patches(x, "max")[0] == 3
    assert reduce_patches(x, "topk", 0.5)[0] == 2.5
    with pytest.raises(ValueError):
        reduce_patches(x, "median")
    with pytest.raises(ValueError, match="2, K, E"):
        CentroidHead(np.zeros((3, 4, 5), np.float32))

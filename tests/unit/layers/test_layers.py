from __future__ import annotations

import numpy as np
import torch

from adcore.layers.adapter import FusionAdapter
from adcore.layers.coreset import greedy_coreset
from adcore.layers.losses import dice_loss, focal_loss, fusion_loss
from adcore.layers.vae import VAEConfig, fit_vae_centroids


def test_adapter_shapes():
    adapter = FusionAdapter(width=12, text_dim=8)
    anchors = torch.nn.functional.normalize(torch.randn(8, 2), dim=0)
    fused, cls_text, seg_text = adapter(torch.randn(2, 5, 12), anchors)
    assert fused.shape == (2, 5, 12) and cls_text.shape == (2, 5, 2) and seg_text.shape == (2, 5, 2)
    assert seg_text.abs().max() <= 1 + 1e-5  # cosine similarities


def test_losses_are_low_for_right_and_high_for_wrong_predictions():
    target = torch.zeros(1, 8, 8)
    target[0, 2:5, 2:5] = 1
    good = torch.where(target > 0, 8.0, -8.0)
    assert dice_loss(torch.sigmoid(good), target) < 0.01
    assert dice_loss(torch.sigmoid(-good), target) > 0.9
    assert focal_loss(good, target) < focal_loss(-good, target)
    parts = fusion_loss(torch.tensor([5.0]), good, torch.tensor([1.0]), target)
    assert parts["loss"] < 0.1


def test_vae_centroids_cover_clusters():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16)).astype(np.float32) * 5
    x = np.concatenate([c + 0.1 * rng.standard_normal((200, 16)) for c in centres]).astype(np.float32)
    out = fit_vae_centroids(x, VAEConfig(epochs=60, lr=3e-3, n_centroids=8))
    assert out.shape == (8, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    unit = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    best = (unit @ out.T).max(1)  # each true cluster has a centroid pointing at it
    assert (best > 0.9).all(), best


def test_vae_always_returns_k_centroids():
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    assert fit_vae_centroids(x, VAEConfig(epochs=1, n_centroids=16)).shape == (16, 6)


def test_vae_leaves_global_rng_alone_and_is_deterministic():
    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    cfg = VAEConfig(epochs=2, batch_size=16, n_centroids=4, seed=3)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = fit_vae_centroids(x, cfg)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    torch.manual_seed(456)  # another global state must not change the result
    np.testing.assert_array_equal(fit_vae_centroids(x, cfg), first)
    other = fit_vae_centroids(x, VAEConfig(epochs=2, batch_size=16, n_centroids=4, seed=4))
    assert not np.array_equal(other, first)  # the seed is what decides


def test_greedy_coreset_picks_spread_points():
    rng = np.random.default_rng(0)
    clusters = np.concatenate([c + 0.01 * rng.standard_normal((100, 3)) for c in np.eye(3) * 10])
    idx = greedy_coreset(clusters, 3, seed=0)
    assert len(set(idx // 100)) == 3  # one point from each far-apart cluster
    assert len(greedy_coreset(clusters, 1000)) == len(clusters)

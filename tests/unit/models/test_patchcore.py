"""PatchCore's head as the paper defines it: map smoothing and the density reweighting (eq. 7) by hand."""

from __future__ import annotations

import numpy as np
import pytest

from adcore.models.patchcore.head import MemoryBankHead, MemoryBankHeadConfig


def _out(emb: np.ndarray, grid: int) -> dict[str, np.ndarray]:
    return {"patch_embeddings": emb, "anomaly_map": np.zeros((len(emb), grid, grid), np.float32)}


def test_reweighting_by_hand():
    bank = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0]], np.float32)
    patches = np.array([[[0.0, 0.1], [0.2, 0.0], [0.1, 0.1], [0.0, -2.0]]], np.float32)  # [1, 4, 2], worst: last
    head = MemoryBankHead(bank, MemoryBankHeadConfig(reweight_k=3))
    scores, _ = head(_out(patches, 2))
    worst = patches[0, 3]
    s_star = 2.0  # its distance to its nearest bank row, [0, 0]
    support = bank[[0, 1, 2]]  # the 3 bank rows nearest [0, 0]: itself, [1, 0], [0, 3]
    d = np.linalg.norm(support - worst, axis=1)
    weight = 1 - np.exp(d[0]) / np.exp(d).sum()  # eq. 7
    assert scores[0] == pytest.approx(weight * s_star, rel=1e-5)
    plain, _ = MemoryBankHead(bank)(_out(patches, 2))
    assert plain[0] == pytest.approx(s_star, rel=1e-5)


def test_patch_whose_nearest_normal_is_rare_weighs_more():
    dense = np.array([[0, 0], [0.1, 0], [0, 0.1], [10, 10], [14, 10], [10, 14]], np.float32)
    head = MemoryBankHead(dense, MemoryBankHeadConfig(reweight_k=3))
    near_dense = np.array([[[0.0, -1.0]]], np.float32)  # 1 from the tight cluster at the origin
    near_sparse = np.array([[[10.0, 9.0]]], np.float32)  # 1 from [10, 10], whose neighbours are 4 away
    a, _ = head(_out(near_dense, 1))
    b, _ = head(_out(near_sparse, 1))
    assert b[0] > a[0]


def test_smoothing_spreads_the_map_and_leaves_the_image_score():
    bank = np.zeros((1, 2), np.float32)
    emb = np.zeros((1, 25, 2), np.float32)
    emb[0, 12] = [3.0, 4.0]  # one anomalous patch in the middle of a 5x5 grid
    raw_scores, raw_map = MemoryBankHead(bank)(_out(emb, 5))
    scores, smooth = MemoryBankHead(bank, MemoryBankHeadConfig(map_sigma=1.0))(_out(emb, 5))
    assert raw_map[0, 2, 2] == pytest.approx(5.0) and raw_map[0, 2, 1] == 0
    assert 0 < smooth[0, 2, 2] < 5.0 and smooth[0, 2, 1] > 0 and smooth[0].argmax() == 12
    assert scores[0] == pytest.approx(raw_scores[0])


def test_saved_heads_without_the_fields_score_as_before():
    bank = np.random.default_rng(0).random((20, 4), dtype=np.float32)
    old = MemoryBankHead.from_saved({"k": 1, "reduction": "max"}, {"memory_bank": bank})
    assert old.cfg.map_sigma == 0 and old.cfg.reweight_k == 0
    new = MemoryBankHead.from_saved(
        {"k": 1, "reduction": "max", "map_sigma": 0.3, "reweight_k": 9}, {"memory_bank": bank}
    )
    assert new.cfg.map_sigma == 0.3 and new.cfg.reweight_k == 9


def test_border_average_counts_padding_as_zeros_and_old_configs_do_not():
    """Paper (official zero-padded unfold) and anomalib: a border cell's 3x3 average divides by 9."""
    import torch

    from adcore.models import create
    from adcore.models.patchcore.model import PatchCoreModel

    torch.manual_seed(0)
    model = create("patchcore", tiny=True).eval()
    assert model.cfg.pool_zero_padding
    x = torch.rand(1, 3, model.input_size, model.input_size)
    with torch.no_grad():
        raw = model._feature_maps(x)[0]  # [1, W, g, g]
        emb = model(x).patch_embeddings[0, :, : raw.shape[1]]  # first layer's columns, [g*g, W]
    corner = raw[0, :, :2, :2].sum((1, 2))  # the 4 cells inside the corner's window
    torch.testing.assert_close(emb[0], corner / 9, rtol=1e-5, atol=1e-6)
    old = {k: v for k, v in model.config_dict().items() if k != "pool_zero_padding"}
    before = PatchCoreModel.from_config_dict(old).eval()  # eval: a CNN backbone has batch norm
    assert not before.cfg.pool_zero_padding
    before.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(before(x).patch_embeddings[0, 0, : raw.shape[1]], corner / 4, rtol=1e-5, atol=1e-6)


def _fit(overrides: dict, n_images: int) -> int:
    """Rows of the memory bank PatchCore (tiny) fits on ``n_images`` images with config ``overrides``."""
    import torch

    from adcore.models import create
    from adcore.models.patchcore.fit import fit_memory_bank
    from adcore.training.data import SyntheticAnomalyBatches
    from adcore.training.fit import FitData

    torch.manual_seed(0)
    model = create("patchcore", tiny=True, **overrides).eval()
    rng = np.random.default_rng(0)
    images = [rng.random((model.input_size, model.input_size)).astype(np.float32) for _ in range(n_images)]
    batches = SyntheticAnomalyBatches(images, [None] * n_images, np.zeros(n_images), model.input_size, 4, 0.0)
    return len(fit_memory_bank(model, FitData(batches)).bank), model.grid**2 * n_images


def test_bank_is_the_ratio_of_the_patches_and_grows_with_the_training_set():
    rows_4, patches_4 = _fit({"coreset_ratio": 0.1}, 4)
    rows_8, patches_8 = _fit({"coreset_ratio": 0.1}, 8)
    assert rows_4 == int(0.1 * patches_4) and rows_8 == int(0.1 * patches_8)  # no fixed cap by default
    assert _fit({"coreset_ratio": 0.1, "max_bank": 5}, 8)[0] == 5  # a fixed cap when given
    if not __import__("torch").cuda.is_available():  # without a GPU the selection is capped at cpu_max_bank
        assert _fit({"coreset_ratio": 0.1, "cpu_max_bank": 7}, 8)[0] == 7

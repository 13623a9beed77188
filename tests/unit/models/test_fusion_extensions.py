"""The fusion model's extensions beyond the paper (docs/models/fusion.md), each on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from adcore import metrics
from adcore.layers.coreset import greedy_coreset
from adcore.models import create
from adcore.models.fusion.fit import fit_centroids, kmeans_centroids
from adcore.models.fusion.head import CentroidHead, CentroidHeadConfig
from adcore.scorer import Scorer
from adcore.training.data import SyntheticAnomalyBatches
from adcore.training.fit import FitData
from adcore.training.select import select_on_validation

INLINE = {"adapter_side": False, "train_last_layers": 1, "domain_train_layers": 2}  # the paper's adapter placement
EXTENSIONS = ("memory_layers", "adapter_residual", "train_scored", "clean_centroids", "centroid_method")


def test_paper_presets_have_no_extension_and_fusion_small_has_all():
    for name in ("fusion-large", "fusion-small-paper"):
        cfg = create(name, tiny=True).cfg
        assert cfg.memory_layers == [] and not (cfg.adapter_residual or cfg.train_scored or cfg.clean_centroids)
        assert not cfg.adapter_side and cfg.epoch_average == 0 and cfg.domain_train_layers == 2
        assert cfg.centroid_method == "vae" and cfg.synthesis == "default"
    cfg = create("fusion-small", tiny=True).cfg
    assert cfg.memory_layers and cfg.adapter_residual and cfg.train_scored and cfg.clean_centroids
    assert cfg.adapter_side and cfg.train_last_layers == 0 and cfg.domain_train_layers == 0
    assert cfg.centroid_method == "kmeans" and cfg.synthesis == "smooth"


def _vision_input_after_first_point(model, x):
    seen = {}
    hook = model.vision.layers[model.points[0]].register_forward_pre_hook(
        lambda module, args: seen.setdefault("h", args[0].clone())
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    return seen["h"]


def test_residual_adapters_start_at_identity_then_add():
    torch.manual_seed(0)
    model = create("fusion-small", tiny=True, **INLINE).eval()
    x = torch.rand(2, 3, model.input_size, model.input_size)
    p, q = model.points[0], model.domain_points[0]
    with torch.no_grad():
        c = model.vision.hidden_states(x)[0][p]
    torch.testing.assert_close(_vision_input_after_first_point(model, x), c, atol=1e-6, rtol=0)  # untouched
    with torch.no_grad():  # trained adapters: h = C_1 + F_1 (no alpha blend)
        for layer in (model.adapters[0].cls_out, model.adapters[0].seg_out):
            layer.weight.normal_()
        b = model.domain_to_vision(model.domain.hidden_states(x)[0][q])
        f = model.adapters[0](model.cfg.beta * c + model.cfg.gamma * b, model.anchors)[0]
    assert f.abs().max() > 1e-2
    torch.testing.assert_close(_vision_input_after_first_point(model, x), c + f, atol=1e-5, rtol=0)


def test_train_scored_logit_is_the_logit_of_the_exported_score():
    torch.manual_seed(0)
    for scored in (True, False):
        model = create("fusion-small", tiny=True, train_scored=scored).eval()
        with torch.no_grad():
            out = model(torch.rand(2, 3, model.input_size, model.input_size))
        match = torch.allclose(torch.sigmoid(out.image_logit), out.score, atol=1e-5)
        assert match == scored


@pytest.mark.parametrize("zero_padding", [True, False])
def test_memory_columns_are_pooled_frozen_domain_features(zero_padding):
    torch.manual_seed(0)
    model = create("fusion-small", tiny=True, memory_zero_padding=zero_padding).eval()
    x = torch.rand(2, 3, model.input_size, model.input_size)
    with torch.no_grad():
        emb = model(x).patch_embeddings
        states = model.domain.hidden_states(x)[0]
    g, maps = model.grid, []
    for i in model.cfg.memory_layers:  # by hand: 3x3 sums over the cells inside, then concatenated
        t = states[i][:, 1:].transpose(1, 2).reshape(2, -1, g, g)
        total = F.conv2d(t, torch.ones(t.shape[1], 1, 3, 3), padding=1, groups=t.shape[1])
        # PatchCore's border rule divides by the whole window; the other by the cells inside it
        inside = F.conv2d(torch.ones(1, 1, g, g), torch.ones(1, 1, 3, 3), padding=1)
        maps.append(total / 9 if zero_padding else total / inside)
    want = torch.cat(maps, 1).flatten(2).transpose(1, 2)
    assert emb.shape[-1] == model.embedding_dim == model.proj_dim + want.shape[-1]
    torch.testing.assert_close(emb[..., model.proj_dim :], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb[..., : model.proj_dim].norm(dim=-1), torch.ones(2, g * g))
    assert create("fusion-small", tiny=True).cfg.memory_zero_padding  # the preset uses PatchCore's rule


def test_memory_head_blends_nearest_normal_distance_by_hand():
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((2, 3, 4)).astype(np.float32)
    bank = rng.standard_normal((6, 5)).astype(np.float32)
    cfg = CentroidHeadConfig(
        alpha_few=0.2, reduction="mean", centroid_dim=4, memory_weight=0.3, memory_loc=1.5, memory_scale=0.5
    )
    head = CentroidHead(centroids, cfg, memory=bank)
    emb = rng.standard_normal((1, 4, 9)).astype(np.float32)
    emb[0, 0, 4:] = bank[2]  # a patch on a memory row: distance 0
    out = {"score": np.array([0.4], np.float32), "anomaly_map": np.full((1, 2, 2), 0.3, np.float32)}
    score, amap = head({**out, "patch_embeddings": emb})
    d = np.sqrt(((emb[0, :, None, 4:] - bank[None]) ** 2).sum(-1)).min(1)  # [4]
    assert d[0] == pytest.approx(0, abs=1e-3)
    mem = 1 / (1 + np.exp(-(d - 1.5) / 0.5))
    few = head.few_shot_map(emb[..., :4])[0]
    want_map = 0.7 * (0.8 * 0.3 + 0.2 * few) + 0.3 * mem
    np.testing.assert_allclose(amap.reshape(-1), want_map, atol=1e-5)
    assert score[0] == pytest.approx(0.7 * (0.8 * 0.4 + 0.2 * few.mean()) + 0.3 * mem.max(), abs=1e-5)
    again = CentroidHead.from_saved(head.config(), head.arrays())
    np.testing.assert_allclose(again({**out, "patch_embeddings": emb})[1], amap)


def test_memory_score_reweighted_as_patchcore_eq7():
    """With ``memory_reweight_k`` the memory branch's image score is sigmoid((PatchCore's eq. 7 - loc) / scale)."""
    from adcore.models.patchcore.head import MemoryBankHead, MemoryBankHeadConfig

    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((2, 3, 4)).astype(np.float32)
    bank = rng.standard_normal((40, 5)).astype(np.float32)
    bank[:10] *= 0.05  # a dense cluster and a sparse rest: the weights differ between images
    emb = rng.standard_normal((6, 9, 9)).astype(np.float32)
    emb[:3, :, 4:] *= 0.1  # images whose worst patch lies near the dense cluster
    out = {"score": np.zeros(6, np.float32), "anomaly_map": np.zeros((6, 3, 3), np.float32)}
    loc, scale = 1.2, 0.7
    cfg = CentroidHeadConfig(centroid_dim=4, memory_weight=1.0, memory_loc=loc, memory_scale=scale, memory_reweight_k=5)
    score, _ = CentroidHead(centroids, cfg, memory=bank)({**out, "patch_embeddings": emb})
    patchcore, _ = MemoryBankHead(bank, MemoryBankHeadConfig(reweight_k=5))(
        {"patch_embeddings": emb[..., 4:], "anomaly_map": out["anomaly_map"]}
    )
    np.testing.assert_allclose(score, 1 / (1 + np.exp(-(patchcore - loc) / scale)), rtol=1e-5)
    cfg.memory_reweight_k = 0
    plain, _ = CentroidHead(centroids, cfg, memory=bank)({**out, "patch_embeddings": emb})
    assert np.all(score < plain)  # every weight is below 1


def test_kmeans_centroids_are_spread_not_collapsed():
    rng = np.random.default_rng(0)
    clusters = rng.standard_normal((4, 16)) * 5
    x = np.concatenate([c + rng.standard_normal((50, 16)) for c in clusters]).astype(np.float32)
    centres = kmeans_centroids(x, 4)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1, atol=1e-5)
    cos = centres @ centres.T
    assert cos[~np.eye(4, dtype=bool)].max() < 0.9  # the paper's VAE decodes 16 nearly parallel ones here


def _fit_data(model, seed=0):
    rng = np.random.default_rng(seed)
    size = model.input_size
    yy, xx = np.mgrid[:size, :size] / size
    images = [(0.3 + 0.2 * np.sin(6 * xx + i) * np.cos(5 * yy) + 0.05 * rng.random((size, size))) for i in range(8)]
    batches = SyntheticAnomalyBatches(images, [None] * 8, np.zeros(8), size, batch_size=4, anomaly_share=1.0)
    return FitData(batches, seed=seed, quick=True)


def test_memory_bank_follows_the_training_patches():
    """The bank is memory_coreset_ratio of the patches with no fixed cap; a set cap or the CPU cap bounds it."""
    torch.manual_seed(0)
    rows = {}
    for name, overrides in {"ratio": {}, "fixed": {"memory_max_bank": 5}, "cpu": {"memory_cpu_max_bank": 7}}.items():
        model = create("fusion-small", tiny=True, memory_coreset_ratio=0.5, **overrides).eval()
        rows[name] = len(fit_centroids(model, _fit_data(model)).memory)
    patches = 8 * model.grid**2
    if not torch.cuda.is_available():
        assert rows["cpu"] == 7
    assert rows["ratio"] == min(int(0.5 * patches), 8192 if not torch.cuda.is_available() else patches)
    assert rows["fixed"] == 5


def test_fit_builds_memory_and_clean_centroids():
    torch.manual_seed(0)
    model = create("fusion-small", tiny=True).eval()
    data = _fit_data(model)
    head = fit_centroids(model, data)
    cut = model.proj_dim
    assert head.cfg.centroid_dim == cut and head.cfg.memory_weight == model.cfg.memory_weight
    assert head.memory.shape[1] == model.memory_dim and 0 < len(head.memory) < 8 * model.grid**2
    # the bank holds clean normal features: rows of the clean pass, not of images with synthetic anomalies
    clean, proj = [], []
    for batch in data.batches.epoch(10_000, anomaly_share=0.0):
        with torch.no_grad():
            emb = model(batch.images).patch_embeddings
        clean.append(emb[..., cut:].reshape(-1, model.memory_dim).numpy())
        proj.append(emb[..., :cut].reshape(-1, cut).numpy())
    clean, proj = np.concatenate(clean), np.concatenate(proj)
    nearest = np.sqrt(((head.memory[:, None] - clean[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(nearest, 0, atol=1e-4)
    # the probability scale comes from held-out images: the odd images' distances to a bank of the even ones
    feats = clean.reshape(8, model.grid**2, -1)
    half = feats[0::2].reshape(-1, feats.shape[-1])
    half = half[greedy_coreset(half, max(1, int(len(half) * model.cfg.memory_coreset_ratio)), seed=data.seed)]
    held = np.sqrt(((feats[1::2].reshape(-1, feats.shape[-1])[:, None] - half[None]) ** 2).sum(-1)).min(1)
    q50, q99 = np.quantile(held, [0.5, 0.99])
    assert head.cfg.memory_loc == pytest.approx(q99, rel=1e-4)
    assert head.cfg.memory_scale == pytest.approx((q99 - q50) / 4, rel=1e-3)
    # clean normal centroids: k-means of the clean pass's patches, not of images that carry an anomaly
    k = model.cfg.n_centroids
    np.testing.assert_allclose(head.centroids[0], kmeans_centroids(proj, k, data.seed), atol=1e-5)
    model.cfg.clean_centroids = False
    contaminated = fit_centroids(model, data)
    assert not np.allclose(contaminated.centroids[0], head.centroids[0], atol=1e-3)
    np.testing.assert_allclose(contaminated.centroids[1], head.centroids[1], atol=1e-5)
    model.cfg.memory_layers = []  # the memory columns are still there, but no bank is built from them
    assert fit_centroids(model, data).memory is None


def test_smooth_intensity_blobs_are_visible_soft_and_inside_the_foreground():
    from adcore.data.synth_smooth import RandSmoothIntensity

    image = np.full((64, 64, 3), 0.4, np.float32)
    fg = np.zeros((64, 64), bool)
    fg[8:56, 8:56] = True
    for seed in range(5):
        out, mask = RandSmoothIntensity(np.random.default_rng(seed))(image, foreground=fg)
        again, mask2 = RandSmoothIntensity(np.random.default_rng(seed))(image, foreground=fg)
        np.testing.assert_array_equal(out, again)  # seeded
        change = np.abs(out - image).max(-1)
        assert mask.any() and not (mask & ~fg).any()
        assert change[mask].min() >= 0.05  # no near-invisible pixel is labelled anomalous
        assert (change[~fg] == 0).all()
        assert np.allclose(out[..., 0], out[..., 1])  # an intensity change, not a colour


def test_smooth_synthesis_reaches_the_training_batches():
    from adcore.models.fusion.train import SYNTHESIS, _WithMakers

    calls = []

    class Recorder:
        def __len__(self):
            return 3

        def epoch(self, epoch, anomaly_share=None, makers=None):
            calls.append((epoch, anomaly_share, makers))
            return iter(())

    wrapped = _WithMakers(Recorder(), SYNTHESIS["smooth"])
    list(wrapped.epoch(2))
    assert len(wrapped) == 3 and calls == [(2, None, SYNTHESIS["smooth"])]
    size = 32
    images = [np.full((size, size), 0.5, np.float32)] * 4
    batches = SyntheticAnomalyBatches(images, [None] * 4, np.zeros(4), size, batch_size=4, anomaly_share=1.0)
    (batch,) = list(_WithMakers(batches, SYNTHESIS["smooth"]).epoch(0))
    assert batch.labels.sum() > 0


def test_memory_head_smooths_the_final_map_and_not_the_score():
    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((2, 3, 4)).astype(np.float32)
    bank = rng.standard_normal((6, 5)).astype(np.float32)
    base = dict(alpha_few=0.2, centroid_dim=4, memory_weight=0.5, memory_loc=1.0, memory_scale=0.5)
    out = {
        "score": np.array([0.4, 0.1], np.float32),
        "anomaly_map": rng.random((2, 4, 4)).astype(np.float32),
        "patch_embeddings": rng.standard_normal((2, 16, 9)).astype(np.float32),
    }
    plain_score, plain_map = CentroidHead(centroids, CentroidHeadConfig(**base), memory=bank)(out)
    head = CentroidHead(centroids, CentroidHeadConfig(**base, map_sigma=1.5), memory=bank)
    score, amap = head(out)
    np.testing.assert_allclose(score, plain_score)
    want = np.stack([ndimage.gaussian_filter(m, 1.5, mode="nearest") for m in plain_map])
    np.testing.assert_allclose(amap, want, atol=1e-6)
    assert not np.allclose(amap, plain_map)
    np.testing.assert_allclose(CentroidHead.from_saved(head.config(), head.arrays())(out)[1], amap)


def test_memory_distances_are_smoothed_before_their_sigmoid():
    """As PatchCore smooths its distances: with memory weight 1 the map is sigmoid(smoothed distances)."""
    from adcore.models.patchcore.head import MemoryBankHead, MemoryBankHeadConfig

    rng = np.random.default_rng(2)
    centroids = rng.standard_normal((2, 3, 4)).astype(np.float32)
    bank = rng.standard_normal((8, 5)).astype(np.float32)
    emb = rng.standard_normal((2, 16, 9)).astype(np.float32)
    out = {"score": np.zeros(2, np.float32), "anomaly_map": rng.random((2, 4, 4)).astype(np.float32)}
    base = dict(alpha_few=0.2, centroid_dim=4, memory_loc=1.0, memory_scale=0.5, map_sigma=1.2, smooth_distances=True)
    _, amap = CentroidHead(centroids, CentroidHeadConfig(**base, memory_weight=1.0), memory=bank)(
        {**out, "patch_embeddings": emb}
    )
    _, patchcore = MemoryBankHead(bank, MemoryBankHeadConfig(map_sigma=1.2))(
        {"patch_embeddings": emb[..., 4:], "anomaly_map": out["anomaly_map"]}
    )
    np.testing.assert_allclose(amap, 1 / (1 + np.exp(-(patchcore - 1.0) / 0.5)), atol=1e-5)
    # a blend: the other part smoothed on its own, the memory part as above
    head = CentroidHead(centroids, CentroidHeadConfig(**base, memory_weight=0.3), memory=bank)
    _, blend = head({**out, "patch_embeddings": emb})
    few = head.few_shot_map(emb[..., :4]).reshape(2, 4, 4)
    rest = np.stack([ndimage.gaussian_filter(m, 1.2, mode="nearest") for m in 0.8 * out["anomaly_map"] + 0.2 * few])
    np.testing.assert_allclose(blend, 0.7 * rest + 0.3 * amap, atol=1e-5)


def _validation_set(size: int, seed: int = 3):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    images, masks, labels = [], [], []
    for i in range(12):
        im = 0.3 + 0.2 * np.sin(6 * xx + i) * np.cos(5 * yy) + 0.05 * rng.random((size, size))
        mask = np.zeros((size, size), bool)
        if i % 2:
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            mask = (yy * size - cy) ** 2 + (xx * size - cx) ** 2 < (size / 6) ** 2
            im = np.where(mask, 1.0, im)
        images.append(im.astype(np.float32))
        masks.append(mask)
        labels.append(i % 2)
    return {"images": images, "masks": masks, "labels": np.array(labels)}


def test_memory_weight_is_chosen_on_validation_and_kept_without_anomalies():
    torch.manual_seed(0)
    model = create("fusion-small", tiny=True).eval()
    head = fit_centroids(model, _fit_data(model))
    assert head.cfg.memory_weight_choices == model.cfg.memory_weight_choices and len(head.validation_choices()) > 1
    base = head.cfg.memory_scale
    first = {"memory_weight": model.cfg.memory_weight, "memory_scale": base}
    assert head.validation_choices()[0] == first  # ties keep the configured one
    scales = sorted({c["memory_scale"] for c in head.validation_choices()})
    assert scales == pytest.approx(sorted(base * m for m in model.cfg.memory_scale_choices))
    scorer = Scorer(model, head)
    valid = _validation_set(model.input_size)
    picked = select_on_validation(scorer, valid, batch_size=4)
    means = [row["mean"] for row in picked["table"]]
    best = picked["table"][int(np.argmax(means))]
    prior = next(row for row in picked["table"] if row["choice"] == picked["prior"])
    assert picked["prior"]["memory_weight"] == 1.0 and picked["margin"] > 0
    if best["mean"] <= prior["mean"] + picked["margin"]:  # the memory branch alone unless clearly beaten
        best = prior
    assert picked["chosen"] == best["choice"] and head.cfg.memory_weight == best["choice"]["memory_weight"]
    assert head.cfg.memory_scale == best["choice"]["memory_scale"]  # also when a later choice had another
    # every row is what scoring the validation split with that weight gives
    for row in picked["table"]:
        head.apply_choice(row["choice"])
        results = scorer.score_images(valid["images"], 4)
        assert row["image_auroc"] == pytest.approx(metrics.image_auroc(valid["labels"], [r.raw_score for r in results]))
        assert row["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(valid["masks"], [r.raw_map for r in results]))
    assert len({round(m, 6) for m in means}) > 1  # the choices differ, so picking the best is a decision
    # a normal-only validation split cannot rank them: the configured weight stays
    head.apply_choice({"memory_weight": 0.25})
    normal = {k: [v[i] for i in range(0, 12, 2)] for k, v in valid.items()}
    normal["labels"] = np.zeros(6, int)
    assert select_on_validation(scorer, normal) is None and head.cfg.memory_weight == 0.25
    with pytest.raises(ValueError, match="not a head setting"):
        head.apply_choice({"temperature_typo": 1})


def test_side_adapters_never_write_back_and_one_frozen_tower_serves_both():
    torch.manual_seed(0)
    model = create("fusion-small", tiny=True, domain_train_layers=2).eval()  # side adapters, two towers
    assert not model.shared_tower and model.domain is not model.vision
    x = torch.rand(2, 3, model.input_size, model.input_size)
    with torch.no_grad():
        c = model.vision.hidden_states(x)[0][model.points[0]]
        before = model(x).patch_embeddings
        for adapter in model.adapters:
            for layer in (adapter.cls_out, adapter.seg_out):
                layer.weight.normal_()
        after = model(x).patch_embeddings
    torch.testing.assert_close(_vision_input_after_first_point(model, x), c, atol=1e-6, rtol=0)  # stream untouched
    assert (after - before)[..., : model.proj_dim].abs().max() > 1e-2  # the last adapter's output is what is embedded
    # The same weights in both towers and no stage 1: one tower, the same outputs.
    shared = create("fusion-small", tiny=True).eval()
    assert shared.shared_tower and shared.domain is shared.vision
    model.domain.load_state_dict(model.vision.state_dict())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("domain.")}
    shared.load_state_dict(state, strict=False)
    calls = []
    hook = shared.vision.layers[0].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        one, two = shared(x), model(x)
    hook.remove()
    assert len(calls) == 1  # the tower ran once
    for key in ("score", "anomaly_map", "patch_embeddings"):
        torch.testing.assert_close(getattr(one, key), getattr(two, key), atol=1e-5, rtol=0)
    shared.train()
    out = shared(x)
    (out.image_logit.sum() + out.map_logit.sum()).backward()
    assert all(p.grad is None for p in shared.vision.parameters())  # no gradient reaches the tower
    assert all(p.grad is not None for p in shared.adapters[-1].parameters())
    with pytest.raises(ValueError, match="train_last_layers"):
        create("fusion-small", tiny=True, train_last_layers=1)


def test_no_domain_layers_means_no_stage_one():
    model = create("fusion-small", tiny=True)
    model.freeze_for_stage(1)
    assert not any(p.requires_grad for p in model.domain.layers.parameters())

"""Labelled anomalies without a mask: image-level supervision only, never normal patches."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from adcore.layers.losses import fusion_loss
from adcore.models import create
from adcore.models.patchcore.fit import fit_memory_bank
from adcore.training.data import SyntheticAnomalyBatches
from adcore.training.fit import FitData


def _images(size: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    return [(0.3 + 0.2 * np.sin(6 * xx + i) * np.cos(5 * yy) + 0.05 * rng.random((size, size))) for i in range(n)]


def _checkerboard(size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (((yy // 4) + (xx // 4)) % 2).astype(np.float32)  # unlike any normal image


@pytest.fixture(scope="module")
def patchcore():
    torch.manual_seed(0)
    model = create("patchcore", tiny=True).eval()
    model.cfg.coreset_ratio, model.cfg.max_bank = 1.0, 10**6  # the bank is every normal patch
    return model


def _with_unmasked_anomaly(size: int, mask=None) -> SyntheticAnomalyBatches:
    images = _images(size, 4) + [_checkerboard(size)]
    return SyntheticAnomalyBatches(images, [None] * 4 + [mask], np.array([0, 0, 0, 0, 1]), size, batch_size=3)


def _patches_of(model, image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.repeat(image[None, None], 3, 1))
    with torch.no_grad():
        return model(x).patch_embeddings[0].numpy()


def test_patchcore_bank_holds_no_patch_of_an_unmasked_anomaly(patchcore):
    size = patchcore.input_size
    batches = _with_unmasked_anomaly(size)
    bank = fit_memory_bank(patchcore, FitData(batches)).bank
    anomalous = _patches_of(patchcore, _checkerboard(size))
    nearest = torch.cdist(torch.from_numpy(anomalous), torch.from_numpy(bank)).min(1).values
    assert nearest.min() > 1e-3
    assert len(bank) == 4 * patchcore.grid**2  # the four normal images' patches only
    assert batches.image_level_only == 1


def test_sdmad_shot_without_mask_has_unknown_patch_targets():
    from adcore.models.sdmad.train import _share

    masks = torch.zeros(2, 8, 8)
    masks[0, :4] = 1
    targets = _share(masks, 2, torch.tensor([True, False]))
    assert targets[0].tolist() == [1, 1, 0, 0] and (targets[1] < 0).all()  # never a normal (0) target


def test_a_masked_anomaly_gives_its_clean_patches_as_before(patchcore):
    size = patchcore.input_size
    mask = np.zeros((size, size), bool)
    mask[: size // 2] = True  # top half anomalous: bottom-half patches are normal ground truth
    batches = _with_unmasked_anomaly(size, mask)
    assert batches.image_level_only == 0
    normal, anomalous = FitData(batches).patches_by_class(patchcore, anomaly_share=0.0)
    assert len(normal) > 4 * patchcore.grid**2 and len(anomalous) > 0


def test_unmasked_anomaly_adds_no_pixel_loss():
    logits = torch.randn(3, 8, 8)
    masks = torch.zeros(3, 8, 8)
    masks[0, 2:5, 2:5] = 1
    labels = torch.tensor([1.0, 0.0, 1.0])
    known = torch.tensor([True, True, False])
    image_logit = torch.tensor([0.5, -0.5, 0.2])
    got = fusion_loss(image_logit, logits, labels, masks, known)
    first_two = fusion_loss(image_logit[:2], logits[:2], labels[:2], masks[:2])
    assert got["dice"] == pytest.approx(float(first_two["dice"]))
    assert got["focal"] == pytest.approx(float(first_two["focal"]))
    assert got["bce"] == pytest.approx(float(fusion_loss(image_logit, logits, labels, masks)["bce"]))
    # changing the unknown image's map changes nothing but the image term
    moved = logits.clone()
    moved[2] += 5
    assert fusion_loss(image_logit, moved, labels, masks, known)["loss"] == pytest.approx(float(got["loss"]))
    none_known = fusion_loss(image_logit, logits, labels, masks, torch.zeros(3, dtype=torch.bool))
    assert float(none_known["dice"]) == 0 and none_known["loss"].requires_grad is False  # no grad inputs here


@pytest.mark.slow
def test_training_log_counts_the_image_level_only_anomalies(tmp_path, caplog):
    import shutil

    from adcore.data.demo import make_demo_dataset
    from adcore.training.loop import TrainConfig, train

    root = make_demo_dataset(tmp_path / "demo", n_train=6, n_valid=4, n_test=2, size=32, n_train_anomalous=2)
    shutil.rmtree(root / "train" / "Ungood" / "anomaly_mask")
    cfg = TrainConfig(preset="patchcore", tiny=True, smoke_test=True, batch_size=4, labelled=2)
    with caplog.at_level(logging.WARNING, logger="adcore.train"):
        train(str(root), cfg)
    assert "2 labelled anomalies have no mask: used for image-level supervision only" in caplog.text


def test_streamed_batches_mark_an_unmasked_anomaly_unknown():
    import pyarrow as pa

    from adcore.training.stream import LISTING_SCHEMA, StreamedBatches, image_level_only

    size = 16
    pixels = np.full((3, 3, size, size), 128, np.uint8)
    decoded = {
        "index": np.arange(3),
        "pixels": pixels,
        "mask": np.zeros((3, size, size), bool),
        "has_mask": np.array([False, False, True]),
        "label": np.array([0, 1, 1], np.int8),
    }
    decoded["mask"][2, :8] = True
    batches = StreamedBatches(lambda epoch: [decoded], n_images=3, batch_size=3, anomaly_share=0.0)
    (batch,) = list(batches.epoch(0))
    assert batch.known.tolist() == [True, False, True]
    assert batch.patch_share(2)[1].tolist() == [-1.0] * 4 and batch.patch_share(2)[2].tolist() == [1, 1, 0, 0]
    listing = pa.table(
        {"index": [0, 1, 2], "uri": ["a", "b", "c"], "mask_uri": ["", "", "m"], "label": [0, 1, 1]},
        schema=LISTING_SCHEMA,
    )
    assert image_level_only(listing) == 1


def test_fusion_memory_and_normal_centroids_leave_an_unmasked_anomaly_out():
    from adcore.models.fusion.fit import fit_centroids

    torch.manual_seed(0)
    model = create("fusion-small", tiny=True).eval()
    assert model.cfg.memory_layers and model.cfg.clean_centroids  # the bank and centroids of the clean pass
    model.cfg.memory_coreset_ratio, model.cfg.memory_max_bank = 1.0, 10**6
    size, cut = model.input_size, model.proj_dim
    head = fit_centroids(model, FitData(_with_unmasked_anomaly(size), quick=True))
    anomalous = _patches_of(model, _checkerboard(size))[:, cut:]
    nearest = torch.cdist(torch.from_numpy(anomalous), torch.from_numpy(head.memory)).min(1).values
    assert nearest.min() > 1e-3 and len(head.memory) == 4 * model.grid**2

"""DRA (papers.md section 4): deviation loss and routing by hand, pseudo anomalies, references, a tiny run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from adcore.data.bmad import list_split
from adcore.data.demo import make_demo_dataset
from adcore.data.errors import DatasetLayoutError
from adcore.data.synth import RandCutMix
from adcore.models import create
from adcore.models.dra.batches import BalancedBatches
from adcore.models.dra.loss import deviation_loss, dra_loss
from adcore.scorer import load, prepare
from adcore.training import TrainConfig, TrainHooks, train
from adcore.training.loop import load_split

KINDS = ["hyperintense_mass", "hypointense_cyst", "diffuse_region"]
UNIT_REF = torch.tensor([-(0.5**0.5), 0.5**0.5])  # mean 0, unbiased std 1: dev = score


def test_deviation_loss_by_hand():
    ref = torch.tensor([-1.0, 0.0, 1.0, 2.0])  # mean 0.5, unbiased std sqrt(5/3)
    scores, targets = torch.tensor([0.5, 7.0, 2.0]), torch.tensor([0.0, 1.0, 1.0])
    std = (5 / 3) ** 0.5
    # inlier |0| = 0; outliers max(0, 5 - 6.5/std) = 0 and max(0, 5 - 1.5/std) = 3.8381...
    want = (0.0 + 0.0 + (5 - 1.5 / std)) / 3
    assert deviation_loss(scores, targets, ref, margin=5.0).item() == pytest.approx(want, abs=1e-6)
    assert deviation_loss(scores, targets, ref, margin=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_routing_of_the_four_heads_by_hand():
    # rows: normal, seen, pseudo, normal; columns: normal, seen, pseudo, residual head
    scores = torch.tensor([[6.0, 1, 2, 0.5], [2, 7, 3, 4], [1, 0.5, 6, 5.5], [4, 1, 1, 1]])
    labels = torch.tensor([0, 1, 2, 0])
    total, parts = dra_loss(scores, labels, UNIT_REF, margin=5.0)
    # normal head: every row, outliers = normal rows: (max(0, 5-6) + |2| + |1| + max(0, 5-4)) / 4
    # seen head: rows 0, 1, 3 (not pseudo), outlier = seen: (|1| + max(0, 5-7) + |1|) / 3
    # pseudo head: rows 0, 2, 3 (not seen), outlier = pseudo: (|2| + max(0, 5-6) + |1|) / 3
    # residual head: every row, outliers = any anomaly: (|0.5| + max(0, 5-4) + max(0, 5-5.5) + |1|) / 4
    want = {"normal": 1.0, "seen": 2 / 3, "pseudo": 1.0, "residual": 0.625}
    assert parts == pytest.approx(want, abs=1e-6)
    assert total.item() == pytest.approx(sum(want.values()), abs=1e-6)


def test_cutmix_pastes_a_jittered_rectangle_and_is_seeded():
    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    out, mask = RandCutMix(np.random.default_rng(1))(image)
    again, _ = RandCutMix(np.random.default_rng(1))(image)
    np.testing.assert_array_equal(out, again)
    assert mask.any() and (out[~mask] == image[~mask]).all()
    ys, xs = np.nonzero(mask)
    area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) / image.size
    assert 0.01 <= area <= 0.16  # official area ratio 0.02-0.15 (rounding of the sides)


def test_balanced_batches_follow_the_official_proportions():
    cfg = create("dra", tiny=True).cfg
    rng = np.random.default_rng(0)
    pixels = [np.broadcast_to(rng.random((32, 32), dtype=np.float32), (3, 32, 32)) for _ in range(10)]
    labels = np.array([0] * 8 + [1] * 2)
    batches = list(BalancedBatches(pixels, labels, cfg, seed=0).epoch(0, steps=20))
    got = torch.cat([b.labels for b in batches])
    assert len(batches) == 20 and batches[0].images.shape == (cfg.batch_size, 3, 32, 32)
    assert (got == 1).float().mean().item() == pytest.approx(1 / 3, abs=0.01)  # 2/3 of each batch from normals
    assert (got == 2).float().mean().item() == pytest.approx(1 / 3, abs=0.05)  # half of those made pseudo
    with pytest.raises(ValueError, match="labelled anomalies"):
        BalancedBatches(pixels, np.zeros(10), cfg, seed=0)


@pytest.fixture(scope="module")
def kinds_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("dra-demo")
    return str(make_demo_dataset(root, n_train=10, n_valid=6, n_test=6, size=64, kinds=KINDS, n_train_anomalous=3))


@pytest.fixture(scope="module")
def trained(kinds_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("dra-art") / "dra"
    states = []
    # deep copies: a state dict holds the optimiser's live tensors (a job saves it at once)
    hooks = TrainHooks(report=lambda metrics, state: states.append((metrics, copy.deepcopy(state()))))
    overrides = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 6, "n_ref": 5}
    cfg = TrainConfig(preset="dra", tiny=True, labelled=2, seed=0, overrides=overrides)
    scorer = train(kinds_demo, cfg, output=str(out), hooks=hooks)
    return scorer, str(out), states


@pytest.mark.slow
def test_tiny_training_with_two_labelled_anomalies(kinds_demo, trained):
    scorer, path, states = trained
    assert [m["epoch"] for m, _ in states] == [1, 2]
    assert all(np.isfinite(m["loss"]) and {"loss_seen", "loss_residual"} <= set(m) for m, _ in states)
    summary = json.loads(Path(path, "config.json").read_text())["training"]
    assert summary["labelled_anomalies"] == 2 and summary["dra_steps"] == 4
    # the image logit is the official one: raw anomaly heads summed, minus the raw normal head
    model = load(path).model
    assert not model.cfg.normalise_heads and not model.cfg.sigmoid_outputs and "head_lo" not in summary
    valid = load_split(kinds_demo, "valid", None)
    pixels = torch.from_numpy(np.stack([prepare(im, model.input_size) for im in valid["images"]]))
    with torch.no_grad():
        heads = model.head_outputs(pixels)[0]
        out = model(pixels)
    torch.testing.assert_close(out.score, heads[:, 1:].sum(1) - heads[:, 0])
    (result,) = load(path).score_images([np.random.default_rng(0).random((50, 70), dtype=np.float32)])
    assert result.mask.shape == (50, 70) and 0 <= result.score <= 1  # calibrated


def test_artifacts_saved_before_keep_normalised_heads_and_sigmoid_outputs():
    torch.manual_seed(0)
    model = create("dra", tiny=True).eval()
    saved = model.config_dict()
    del saved["normalise_heads"], saved["sigmoid_outputs"]
    old = type(model).from_config_dict(saved)
    assert old.cfg.normalise_heads and old.cfg.sigmoid_outputs
    old.load_state_dict(model.state_dict())
    old.set_normalisation(torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([2.0, 3.0, 6.0, 4.0]))
    x = torch.rand(2, 3, model.input_size, model.input_size)
    with torch.no_grad():
        heads = old.head_outputs(x)[0]
        z = (heads - old.head_lo) / (old.head_hi - old.head_lo)
        torch.testing.assert_close(old(x).score, torch.sigmoid(z[:, 1:].sum(1) - z[:, 0]))


def test_strongly_anomalous_images_keep_their_order():
    torch.manual_seed(0)
    model = create("dra", tiny=True).eval()
    with torch.no_grad():  # the seen head far past the float32 range of a sigmoid, and image-dependent
        model.seen_head.scoring.weight.mul_(1e4)
        model.seen_head.scoring.bias.fill_(60.0)
    x = torch.rand(4, 3, model.input_size, model.input_size)
    with torch.no_grad():
        score = model(x).score
    assert score.dtype == torch.float32 and score.min() > 40  # sigmoid(40) is 1.0 in float32
    assert len(set(score.tolist())) == 4
    model.cfg.sigmoid_outputs = True  # the earlier outputs: all tie at 1.0
    with torch.no_grad():
        assert model(x).score.tolist() == [1.0] * 4


@pytest.mark.slow
def test_reference_normals_are_fixed_at_training_and_reused_at_test(kinds_demo, trained):
    scorer, path, states = trained
    first = states[0][1]["model"]["ref_images"]  # checkpointed after the first epoch
    saved = safetensors.torch.load_file(f"{path}/weights.safetensors")["ref_images"]
    assert saved.shape == (5, 3, 64, 64)
    torch.testing.assert_close(saved, first, rtol=0, atol=0)
    # each reference is one of the normal training images, five distinct ones
    normals = [prepare(s_im, 64) for s_im in load_split(kinds_demo, "train", None)["images"][:10]]
    hits = [next(i for i, n in enumerate(normals) if np.array_equal(n, r)) for r in saved.numpy()]
    assert len(set(hits)) == 5
    again = load(path)
    torch.testing.assert_close(again.model.ref_images, saved, rtol=0, atol=0)
    # and the loaded model scores against them: the residual head's reference input is their features
    model, seen = again.model, []
    hook = model.residual_head.register_forward_hook(lambda _m, args, _out: seen.append(args[1]))
    again.score_images(load_split(kinds_demo, "test", None)["images"][:2])
    hook.remove()
    with torch.no_grad():
        want = model.backbone(saved)
    torch.testing.assert_close(seen[0], want)  # scale 0; scale 1 sees their half-size copies


def test_residual_head_compares_with_the_references():
    torch.manual_seed(0)
    model = create("dra", backbone={"image_size": 64}).eval()  # ImageNet features (random-init ones vanish in eval)
    pixels = torch.rand(2, 3, model.input_size, model.input_size)
    with torch.no_grad():
        model.set_references(torch.rand_like(model.ref_images))
        before = model.head_outputs(pixels)[0]
        model.set_references(torch.rand_like(model.ref_images))
        after = model.head_outputs(pixels)[0]
    torch.testing.assert_close(after[:, :3], before[:, :3])  # the other heads do not look at them
    assert (after[:, 3] - before[:, 3]).abs().min() > 1e-4


def test_dra_refuses_training_without_labelled_anomalies(kinds_demo, tmp_path):
    with pytest.raises(ValueError, match="'dra' trains on labelled anomalies"):
        train(kinds_demo, TrainConfig(preset="dra", tiny=True, smoke_test=True))
    plain = make_demo_dataset(tmp_path / "plain", n_train=6, n_valid=2, n_test=2, size=64)
    with pytest.raises(DatasetLayoutError, match="labelled anomalies"):
        train(str(plain), TrainConfig(preset="dra", tiny=True, smoke_test=True, labelled=2))
    assert [s.label for s in list_split(kinds_demo, "train")] == [0] * 10  # labelled=0: normal images only


@pytest.mark.slow
def test_resume_continues_after_the_saved_epoch_with_the_same_references(kinds_demo, trained):
    _, _, states = trained
    state = states[0][1]  # after epoch 1 of 2
    seen = []
    hooks = TrainHooks(report=lambda metrics, _state: seen.append(metrics), resume=state)
    overrides = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 6, "n_ref": 5}
    scorer = train(kinds_demo, TrainConfig(preset="dra", tiny=True, labelled=2, overrides=overrides), hooks=hooks)
    assert [m["epoch"] for m in seen] == [2]
    # optimiser, scheduler and RNG states (incl. the deviation loss's draws) restored: the same epoch 2
    assert seen[0]["loss"] == pytest.approx(states[1][0]["loss"], rel=1e-5)
    torch.testing.assert_close(scorer.model.ref_images, state["model"]["ref_images"], rtol=0, atol=0)

"""Training end to end at tiny size: stages run, the artifact is complete, thresholds come from validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adcore.data.demo import make_demo_dataset
from adcore.evaluate import evaluate
from adcore.evaluate import main as evaluate_main
from adcore.scorer import load
from adcore.train import main as train_main
from adcore.training import TrainConfig, TrainHooks, train
from adcore.training.skipped import BadImageShareError

# Split sizes differ, so a count says which split a step used (smoke tests cap splits at 8 images).
N_VALID, N_TEST = 6, 10


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return str(
        make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=12, n_valid=N_VALID, n_test=N_TEST, size=64, seed=3)
    )


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fusion-small", "fusion-small-paper", "patchcore"])
def test_smoke_training_produces_a_loadable_calibrated_artifact(demo, tmp_path, preset):
    reports = []
    hooks = TrainHooks(report=lambda metrics, state: reports.append((metrics, state() if state else None)))
    cfg = TrainConfig(preset=preset, tiny=True, smoke_test=True, epochs=2, batch_size=4)
    scorer = train(demo, cfg, output=str(tmp_path / "art"), hooks=hooks)
    if preset.startswith("fusion"):
        stages = [("domain", 1)] if preset == "fusion-small-paper" else []  # fusion-small: no domain layers trained
        assert [(m["stage"], m["epoch"]) for m, _ in reports] == [*stages, ("fusion", 1), ("fusion", 2)], (
            "one report per epoch of each stage"
        )
        assert {"loss", "val_image_auroc", "val_pixel_auroc"} <= set(reports[-1][0])
        assert reports[-1][1]["epoch"] == 2 and reports[-1][1]["model"], (
            "checkpoint state carries the trainable weights"
        )
    again = load(str(tmp_path / "art"))
    cfg_json = json.loads((tmp_path / "art" / "config.json").read_text())
    assert cfg_json["calibration"]["n_valid"] == N_VALID, "calibrated on the validation split"
    assert cfg_json["training"]["config"]["preset"] == preset
    assert again.version == scorer.version
    image = np.random.default_rng(0).random((50, 70), dtype=np.float32)
    (result,) = again.score_images([image])
    assert result.mask.shape == (50, 70) and 0 <= result.score <= 1


@pytest.mark.slow
def test_resume_skips_finished_epochs(demo, tmp_path):
    states = []
    hooks = TrainHooks(report=lambda metrics, state: states.append(state()))
    paper = "fusion-small-paper"  # both stages
    train(demo, TrainConfig(preset=paper, tiny=True, smoke_test=True, epochs=1, batch_size=4), hooks=hooks)
    saved = states[-1]["model"]
    assert any(k.startswith("domain_head.") for k in saved), "stage 1's fine-tuned domain weights are checkpointed"
    assert any(k.startswith("adapters.") for k in saved)
    seen = []
    resumed = TrainHooks(report=lambda m, state: seen.append((m["stage"], m["epoch"])), resume=states[-1])
    train(demo, TrainConfig(preset=paper, tiny=True, smoke_test=True, epochs=3, batch_size=4), hooks=resumed)
    assert seen == [("fusion", 2), ("fusion", 3)], "stage 1 and the finished epoch are not run again"


@pytest.mark.slow
def test_without_epochs_training_runs_until_the_time_budget_is_spent(demo, tmp_path):
    """No --epochs: the gradient stage trains until --minutes is spent, keeping its best epoch (an explicit
    --epochs trains exactly that many: the smoke test above)."""
    reports = []
    cfg = TrainConfig(preset="fusion-small", tiny=True, minutes=0.1, batch_size=4)  # 6 s: several tiny epochs
    train(demo, cfg, output=str(tmp_path / "art"), hooks=TrainHooks(report=lambda m, state: reports.append(m)))
    stage_two = 0.85 * cfg.minutes * 60  # the stage's share of the budget, counted from the run's start
    assert reports[-1]["elapsed_s"] >= stage_two - 0.1, f"stopped after epoch {reports[-1]['epoch']} with budget left"
    training = json.loads((tmp_path / "art" / "config.json").read_text())["training"]
    assert reports[-1]["epochs"] is None and training["selected_epoch"] is not None, "the best epoch is kept"


@pytest.mark.slow
def test_cli_train_then_evaluate(demo, tmp_path, capsys):
    art = str(tmp_path / "pc")
    train_main(["--data", demo, "--preset", "patchcore", "--output", art, "--tiny", "--smoke-test"])
    out_json = tmp_path / "metrics.json"
    evaluate_main(["--data", demo, "--model", art, "--output", str(out_json)])
    table = capsys.readouterr().out
    assert "image_auroc" in table and "pixel_auroc" in table
    metrics = json.loads(out_json.read_text())
    for key in ("image_auroc", "pixel_auroc", "f1_max", "acc", "n_images"):
        assert key in metrics
    assert metrics["n_images"] == N_TEST
    direct = evaluate(load(art), demo, "test")
    assert direct["image_auroc"] == pytest.approx(metrics["image_auroc"])


def test_bad_layout_is_a_clear_error(tmp_path):
    from adcore.data.errors import DatasetLayoutError

    with pytest.raises(DatasetLayoutError, match=str(tmp_path)):
        train(str(tmp_path), TrainConfig(tiny=True, smoke_test=True))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fusion-small", "patchcore"])
def test_normal_only_data_trains_end_to_end_with_a_specificity_threshold(tmp_path, preset):
    """No anomalies anywhere in train/ or valid/ (the common case in hospitals): thresholds come from
    the target specificity on normal validation images."""
    import shutil

    root = make_demo_dataset(tmp_path / "data", n_train=10, n_valid=12, n_test=4, size=64, seed=4)
    shutil.rmtree(root / "valid" / "Ungood")
    cfg = TrainConfig(preset=preset, tiny=True, smoke_test=True, epochs=1, batch_size=4, target_specificity=0.9)
    scorer = train(str(root), cfg, output=str(tmp_path / "art"))
    calib = json.loads((tmp_path / "art" / "config.json").read_text())["calibration"]
    assert calib["method"] == "normal-specificity-0.9"
    assert calib["n_valid"] == 6  # the demo writes half of valid/ as normal images
    normal = [scorer.score_images([im])[0] for im in _valid_images(root)]
    flagged = np.mean([r.label for r in normal])
    assert flagged <= 0.25  # about 1 in 10 of the normal validation images above the 0.9 quantile


def _valid_images(root):
    from adcore.data import bmad

    return [bmad.load_sample(s)[0] for s in bmad.list_split(root, "valid")][:8]


@pytest.mark.slow
def test_epoch_average_is_validated_and_kept_and_fusion_small_skips_stage_one(demo, tmp_path, monkeypatch):
    import adcore.models.fusion.train as fusion_train

    real, calls = fusion_train.validate, []

    def improving(*args, **kwargs):  # the real validation, its figures rising with every call: the last epoch wins
        calls.append(real(*args, **kwargs))
        return {"val_image_auroc": 0.1 * len(calls), "val_pixel_auroc": 0.1 * len(calls)}

    monkeypatch.setattr(fusion_train, "validate", improving)
    reports = []
    hooks = TrainHooks(report=lambda metrics, state: reports.append((metrics, state())))
    cfg = TrainConfig(tiny=True, smoke_test=True, epochs=3, batch_size=4, overrides={"epoch_average": 0.5})
    train(demo, cfg, output=str(tmp_path / "art"), hooks=hooks)
    assert [(m["stage"], m["epoch"]) for m, _ in reports] == [("fusion", 1), ("fusion", 2), ("fusion", 3)]
    raw = [state["model"] for _, state in reports]
    average = [state["average"] for _, state in reports]
    key = "adapters.0.seg_in.weight"
    torch.testing.assert_close(average[0][key], raw[0][key])
    assert not torch.equal(raw[1][key], raw[0][key])  # training moved on
    torch.testing.assert_close(average[1][key], 0.5 * raw[0][key] + 0.5 * raw[1][key])
    torch.testing.assert_close(average[2][key], 0.5 * average[1][key] + 0.5 * raw[2][key])
    assert reports[-1][1]["best"]["epoch"] == 3
    saved = load(str(tmp_path / "art")).model.state_dict()[key]
    torch.testing.assert_close(saved, average[2][key])  # what epoch selection keeps is that epoch's average


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_named_then_refused_above_the_share(tmp_path):
    data = make_demo_dataset(tmp_path / "demo", n_train=10, n_valid=6, n_test=2, size=64, seed=4)
    bad_train = sorted((data / "train" / "good").rglob("*.png"))[3]
    bad_valid = sorted((data / "valid" / "good").rglob("*.png"))[0]
    valid_bytes = bad_valid.read_bytes()
    _truncate(bad_train)
    _truncate(bad_valid)
    cfg = TrainConfig(preset="patchcore", tiny=True, batch_size=4, max_bad_share=0.2)
    train(str(data), cfg, output=str(tmp_path / "art"))
    summary = json.loads((tmp_path / "art" / "config.json").read_text())["training"]["skipped_images"]
    assert summary["train"]["count"] == 1 and summary["train"]["of"] == 10
    assert list(summary["train"]["files"]) == [bad_train.relative_to(data).as_posix()]
    assert list(summary["valid"]["files"]) == [bad_valid.relative_to(data).as_posix()]
    assert json.loads((tmp_path / "art" / "config.json").read_text())["calibration"]["n_valid"] == 5
    strict = TrainConfig(preset="patchcore", tiny=True, batch_size=4, max_bad_share=0.05)
    with pytest.raises(BadImageShareError, match="^1 of 6 valid images cannot be read or decoded"):
        train(str(data), strict)
    bad_valid.write_bytes(valid_bytes)
    with pytest.raises(BadImageShareError, match="^1 of 10 train images cannot be read or decoded"):
        train(str(data), strict)

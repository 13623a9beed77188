"""Every registered preset, at tiny size: forward, backward, save, load (timm's test_models habit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adcore.models import create, family_for, from_config, list_models, preset
from adcore.scorer import load
from adcore.testing import tiny_scorer


def test_registry_lists_paper_and_cpu_presets():
    names = list_models()
    assert {"fusion-large", "fusion-small", "patchcore", "patchcore-dinov2"} <= set(names)
    with pytest.raises(KeyError, match="unknown preset 'no-such-model'"):
        preset("no-such-model")
    with pytest.raises(KeyError, match="did you mean patchcore"):
        preset("patchcor")


def test_fusion_large_without_weights_says_what_it_needs():
    with pytest.raises(ValueError, match="clip-vit-large-patch14-336"):
        create("fusion-large")


@pytest.mark.parametrize("name", list_models())
def test_preset_forward_backward_save_load(name, tmp_path):
    torch.manual_seed(0)
    model = create(name, tiny=True)
    x = torch.rand(2, 3, model.input_size, model.input_size)
    out = model(x)
    g = model.grid
    assert out.score.shape == (2,) and out.image_logit.shape == (2,)
    assert out.anomaly_map.shape == (2, g, g) and out.map_logit.shape == (2, g, g)
    assert out.patch_embeddings.shape == (2, g * g, model.embedding_dim)
    assert torch.isfinite(out.patch_embeddings).all()
    params = model.trainable_parameters()
    if family_for(model).train is not None:
        assert params, "a family with gradient stages must have trainable parameters"
        (out.image_logit.sum() + out.map_logit.sum()).backward()
        assert all(p.grad is not None for p in params), "every trainable parameter gets a gradient"
        # a probability, or the raw logit itself (families that rank on logits: no float32 ties at 1.0)
        assert ((out.score >= 0) & (out.score <= 1)).all() or torch.equal(out.score, out.image_logit)

    scorer = tiny_scorer(name)
    path = scorer.save(str(tmp_path / name), model_name=name, version=3)
    again = load(path)
    assert again.version == scorer.version and again.meta["version"] == 3
    pixels = np.random.default_rng(0).random((2, 3, model.input_size, model.input_size), dtype=np.float32)
    a, b = scorer.forward(pixels), again.forward(pixels)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5)
    rebuilt = from_config(scorer.model.config_dict())
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in scorer.model.parameters())

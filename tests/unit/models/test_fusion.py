"""The fusion model's paper-specific structure: fusion points, mixing weights, towers of different shapes."""

from __future__ import annotations

import pytest
import torch

from adcore.models import create
from adcore.models.fusion.model import fusion_points
from adcore.models.towers import match_tokens


def test_fusion_points_follow_depth_over_six():
    assert fusion_points(24, 6) == [4, 8, 12, 16, 20, 24]  # paper, CLIP-L
    assert fusion_points(12, 6) == [2, 4, 6, 8, 10, 12]
    with pytest.raises(ValueError):
        fusion_points(4, 6)


def test_paper_defaults_in_config():
    model = create("fusion-small", tiny=True)
    cfg = model.cfg
    assert (cfg.beta, cfg.gamma, cfg.alpha, cfg.alpha_few, cfg.n_centroids) == (0.4, 0.6, 0.5, 0.15, 16)
    assert len(model.adapters) == 6


def test_towers_of_different_width_and_grid_fuse():
    # fusion-large tiny: CLIP vision (32 wide, 4x4 grid) + BEiT (24 wide, 4x4 grid at 64 px / 16)
    model = create("fusion-large", tiny=True, domain={"image_size": 96})  # BEiT grid 6x6 != CLIP 4x4
    assert model.domain.width != model.vision.width and model.domain.grid != model.vision.grid
    out = model(torch.rand(1, 3, model.input_size, model.input_size))
    assert out.anomaly_map.shape == (1, model.grid, model.grid)


def test_domain_state_changes_the_output():
    torch.manual_seed(0)
    model = create("fusion-small", tiny=True).eval()
    x = torch.rand(1, 3, model.input_size, model.input_size)
    before = model(x).anomaly_map.clone()
    with torch.no_grad():
        for p in model.domain.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert not torch.allclose(before, model(x).anomaly_map)


def test_stage_freezing():
    model = create("fusion-small", tiny=True)
    model.freeze_for_stage(1)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("domain.", "domain_head.")) for n in names)
    model.freeze_for_stage(2)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("adapters.") for n in names) and not any(n.startswith("domain.") for n in names)


def test_match_tokens_resamples_grid():
    tokens = torch.randn(2, 1 + 36, 8)
    out = match_tokens(tokens, 4)
    assert out.shape == (2, 17, 8)
    assert torch.equal(out[:, 0], tokens[:, 0])

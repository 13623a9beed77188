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
    model = create("fusion-small-paper", tiny=True).eval()
    x = torch.rand(1, 3, model.input_size, model.input_size)
    before = model(x).anomaly_map.clone()
    with torch.no_grad():
        for p in model.domain.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert not torch.allclose(before, model(x).anomaly_map)


def test_stage_freezing():
    model = create("fusion-small-paper", tiny=True)
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


@pytest.mark.parametrize(
    "name,overrides", [("fusion-small-paper", {}), ("fusion-large", {"domain": {"image_size": 96}})]
)
def test_first_fusion_point_follows_the_paper_formulas(name, overrides):
    # input_1 = beta * C_1 + gamma * B_1 -> adapter -> alpha * F_1 + (1 - alpha) * C_1 (papers.md section 1).
    # Distinct weights: swapping beta/gamma, or alpha/(1 - alpha), changes both tensors below.
    beta, gamma, alpha = 0.3, 0.7, 0.25
    torch.manual_seed(0)
    model = create(name, tiny=True, beta=beta, gamma=gamma, alpha=alpha, **overrides).eval()
    assert (model.cfg.beta, model.cfg.gamma, model.cfg.alpha) == (beta, gamma, alpha)
    x = torch.rand(2, 3, model.input_size, model.input_size)
    p, q = model.points[0], model.domain_points[0]
    assert p < model.vision.depth  # the residual is read as the input of the next vision layer

    seen = {}

    def keep(key):
        def hook(module, args):  # returns None: the forward's inputs are left as they are
            seen[key] = args[0].clone()

        return hook

    hooks = [
        model.adapters[0].register_forward_pre_hook(keep("adapter_in")),
        model.vision.layers[p].register_forward_pre_hook(keep("residual")),
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()  # before the hand computation, which runs the same layers again
    with torch.no_grad():
        # By hand, from each tower run on its own (nothing is fused before the first point).
        c = model.vision.hidden_states(x)[0][p]
        b = match_tokens(model.domain_to_vision(model.domain.hidden_states(x)[0][q]), model.vision.grid)
        fused_in = beta * c + gamma * b
        f = model.adapters[0](fused_in, model.anchors)[0]
        residual = alpha * f + (1 - alpha) * c
    assert not torch.allclose(c, b, atol=1e-3)  # the towers differ, so a swap is visible
    torch.testing.assert_close(seen["adapter_in"], fused_in, atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["residual"], residual, atol=1e-5, rtol=0)


def _tower_inputs(model, image) -> dict[str, torch.Tensor]:
    """The pixels each tower of ``model`` resizes ``image`` (the original) to, un-normalised."""
    import numpy as np

    from adcore.scorer import prepare

    seen = {}
    for name in ("vision", "domain"):
        tower = getattr(model, name)

        def record(x, tower=tower, name=name, original=tower.prepare):
            out = original(x)
            seen[name] = out * tower.std + tower.mean
            return out

        tower.prepare = record
    with torch.no_grad():
        model(torch.from_numpy(np.ascontiguousarray(prepare(image, model.input_size)))[None])
    return seen


def test_fusion_large_towers_each_see_their_own_resize_of_the_original():
    import numpy as np

    from adcore.scorer import prepare

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:200, :200] / 200
    original = (0.5 + 0.3 * np.sin(40 * xx) * np.cos(30 * yy) + 0.1 * rng.random((200, 200))).astype(np.float32)
    model = create("fusion-large", tiny=True).eval()
    v_size, d_size = model.vision.image_size, model.domain.image_size
    assert d_size > v_size and model.input_size == d_size  # the larger tower's size: BEiT's, not CLIP's
    seen = _tower_inputs(model, original)
    own = {
        name: torch.from_numpy(prepare(original, size))[None] for name, size in (("vision", v_size), ("domain", d_size))
    }
    torch.testing.assert_close(seen["domain"], own["domain"], atol=1e-5, rtol=0)  # the original at its size
    near = (seen["vision"] - own["vision"]).abs().mean()
    assert seen["vision"].shape[-1] == v_size and near < 0.02  # an antialiased reduction: close to its own resize
    # artifacts saved before: the network took the vision tower's size and the domain tower upsampled it
    saved = model.config_dict()
    del saved["input_size"]
    old = type(model).from_config_dict(saved).eval()
    assert old.input_size == v_size
    upsampled = _tower_inputs(old, original)["domain"]
    assert (upsampled - own["domain"]).abs().mean() > 1e-3  # an upsampled copy of CLIP's input, not its own resize

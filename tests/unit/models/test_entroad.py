"""EntroAD: structural entropy by hand, the graph read from transformers, routing, the confidence blend,
and the zero-shot protocol (trained on one demo domain, evaluated on the other)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adcore.evaluate import evaluate
from adcore.layers.structural_entropy import graph_smooth, node_entropy, patch_graph
from adcore.models import create
from adcore.training import TrainConfig, train


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create("entroad-small", tiny=True).eval()


def test_entropy_by_hand_uniform_is_max_one_hot_is_min():
    graph = torch.tensor(
        [
            [[1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0], [0.5, 0.25, 0.25]],
        ]
    )
    h = node_entropy(graph)[0]
    by_hand = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(3)  # = 0.9464
    np.testing.assert_allclose(h.numpy(), [1.0, 0.0, by_hand], atol=1e-6)
    rows = torch.softmax(torch.randn(1, 50, 9, generator=torch.Generator().manual_seed(0)), -1)
    assert ((node_entropy(rows) > 0) & (node_entropy(rows) < 1)).all(), "every other row lies in between"


def test_patch_graph_drops_cls_averages_heads_and_renormalises():
    attn = torch.zeros(1, 2, 3, 3)  # CLS + 2 patches, 2 heads
    attn[0, 0] = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.0], [0.2, 0.4, 0.4]])
    attn[0, 1] = torch.tensor([[1, 0, 0], [0.5, 0.0, 0.5], [0.2, 0.0, 0.8]])
    graph = patch_graph(attn, 2)[0]
    # head mean of the patch block: [[0.25, 0.25], [0.2, 0.6]], rows renormalised
    np.testing.assert_allclose(graph.numpy(), [[0.5, 0.5], [0.25, 0.75]], atol=1e-6)
    x = torch.tensor([[[1.0], [3.0]]])
    np.testing.assert_allclose(graph_smooth(graph[None], x)[0, :, 0].numpy(), [2.0, 2.5], atol=1e-6)


def test_entropy_is_read_from_the_transformers_attention(tiny):
    x = torch.rand(2, 3, tiny.input_size, tiny.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        b = tiny.branches(x)
        v = tiny.vision
        out = v.model(pixel_values=v.prepare(x), output_attentions=True)
    n = tiny.grid**2
    want = torch.stack([node_entropy(patch_graph(out.attentions[i - 1], n)) for i in tiny.cfg.entropy_layers]).mean(0)
    np.testing.assert_allclose(b.entropy.numpy(), want.numpy(), atol=1e-6)
    assert b.entropy.shape == (2, n) and ((b.entropy >= 0) & (b.entropy <= 1 + 1e-6)).all()


def test_routing_is_deterministic_batch_independent_and_follows_entropy(tiny):
    x = torch.rand(3, 3, tiny.input_size, tiny.input_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, again, alone = tiny.branches(x), tiny.branches(x), tiny.branches(x[1:2])
    assert torch.equal(a.route, again.route)
    np.testing.assert_allclose(a.route[1:2].numpy(), alone.route.numpy(), atol=1e-6)
    entropy = torch.tensor([[0.2, 0.5, 0.9, 0.4]])
    route = tiny.route(entropy)[0]
    assert route.argsort().tolist() == entropy[0].argsort().tolist(), "higher entropy -> more to the diffuse path"
    assert torch.allclose(tiny.route(torch.full((1, 4), 0.7)), torch.full((1, 4), 0.5)), "flat entropy: no preference"


def test_confidence_blends_learned_and_frozen_prompts(tiny):
    x = torch.rand(2, 3, tiny.input_size, tiny.input_size, generator=torch.Generator().manual_seed(3))
    model = create("entroad-small", tiny=True).eval()
    model.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        start = model.branches(x)
        assert torch.allclose(start.learned_logit, start.prior_logit, atol=1e-5), "delta 0: branches agree"
        model.prompt_delta.copy_(torch.randn(model.prompt_delta.shape, generator=torch.Generator().manual_seed(4)))
        b = model.branches(x)
    k = (2 * torch.sigmoid(b.learned_logit) - 1).abs()
    np.testing.assert_allclose(b.confidence.numpy(), k.numpy(), atol=1e-6)
    z = model.entropy_zscore(b.entropy)
    np.testing.assert_allclose(b.evidence.numpy(), (-model.entropy_weight * z).detach().numpy(), atol=1e-6)
    blend = k * b.learned_logit + (1 - k) * b.prior_logit + b.evidence
    np.testing.assert_allclose(b.output.map_logit.flatten(1).numpy(), blend.numpy(), atol=1e-5)
    assert not torch.allclose(b.learned_logit, b.prior_logit)
    assert torch.equal(model.prior_prompts, tiny.prior_prompts), "the prior prompts are not trained"


def test_vision_tower_is_frozen(tiny):
    trainable = {id(p) for p in tiny.trainable_parameters()}
    assert trainable and not any(id(p) in trainable for p in tiny.vision.parameters())
    tiny.train()
    assert not tiny.vision.training and tiny.salient.training
    tiny.eval()


@pytest.mark.slow
def test_zero_shot_protocol_train_on_brain_score_chest(tmp_path):
    from adcore.data.demo import make_demo_dataset
    from adcore.data.demo_chest import make_chest_dataset

    brain = make_demo_dataset(tmp_path / "brain", n_train=6, n_valid=4, n_test=4, size=64)
    chest = make_chest_dataset(tmp_path / "chest", n_train=2, n_valid=2, n_test=4, size=64)
    cfg = TrainConfig(preset="entroad-small", tiny=True, epochs=2, batch_size=4, smoke_test=True)
    scorer = train(str(brain), cfg, output=str(tmp_path / "art"))
    before = {k: v.clone() for k, v in create("entroad-small", tiny=True).state_dict().items()}
    assert any(not torch.equal(before[k], v) for k, v in scorer.model.state_dict().items() if "salient" in k)
    row = evaluate(scorer, str(chest))
    assert row["n_images"] == 4 and row["image_auroc"] is not None and row["pixel_auroc"] is not None
